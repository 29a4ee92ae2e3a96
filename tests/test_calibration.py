"""Measured costs: the fit, a calibration run (with a fake clock, and with real CPU timings on
tiny shapes), the stored tables and their lookup, and how the dispatcher uses and labels them."""
import dataclasses
import json

import pytest
import torch

import vitfree.ops.calibrate as measure
import vitfree.ops.calibration as calib
import vitfree.ops.dispatch as dispatch
from vitfree.ops import choose_backend, estimate_costs, explain_choice
from vitfree.windows import LayerWindows

pytestmark = pytest.mark.usefixtures('one_thread')

TINY = (((6, 6), 1, 1), ((8, 8), 2, 1), ((10, 10), 1, 2))


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, tmp_path):
    monkeypatch.setenv('VITFREE_CACHE_DIR', str(tmp_path / 'cache'))
    monkeypatch.delenv(calib.ENV_FILE, raising=False)
    monkeypatch.setattr(calib, 'TABLE_DIR', tmp_path / 'shipped')
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    yield
    calib._installed.clear()
    calib._found.clear()
    calib._auto_tried.clear()
    calib._on_change()


def test_fit_recovers_constants_and_stays_non_negative():
    works = [1e6, 3e6, 1e7, 5e7]
    f = measure.fit_linear(works, [2e-5 + 3e-12 * w for w in works])
    assert f.call == pytest.approx(2e-5, rel=1e-6) and f.per_unit == pytest.approx(3e-12, rel=1e-6)
    assert f.rel_err < 1e-9 and f.samples == 4
    g = measure.fit_linear(works, [1e-3, 1e-3, 1e-3, 1e-3])  # no growth: a pure call cost
    assert g.per_unit == 0 and g.call == pytest.approx(1e-3)
    h = measure.fit_linear([1e6, 2e6], [1e-3, 1e-3 * 3])  # would need a negative call cost
    assert h.call >= 0 and h.per_unit > 0
    with pytest.raises(ValueError, match='positive'):
        measure.fit_linear([1.0], [0.0])


def _fake_timer(rates):
    """A clock where backend ``name`` takes ``call + rate * work`` seconds; reads the backend from
    the closure the calibration hands it."""
    def timer(fn):
        name = fn.__defaults__[0]
        q, windows = fn.__defaults__[1], fn.__defaults__[4]
        work = dispatch._BACKENDS[name].work(q, windows, 1)
        call, rate = rates[name]
        return call + rate * work
    return timer


def test_calibration_with_a_fake_clock_drives_the_choice():
    rates = {'dense': (1e-5, 1e-12), 'tiled': (1e-4, 1e-13)}
    cal = measure.calibrate('cpu', ['dense', 'tiled'], TINY, TINY[:2], timer=_fake_timer(rates), progress=None)
    assert cal.device == 'cpu' and set(cal.backends()) == {'dense', 'tiled'}
    for name, (call, rate) in rates.items():
        for key in ('lowp-infer', 'lowp-train', 'fp32-infer', 'fp32-train'):
            f = cal.fits[name][key]
            assert f.call == pytest.approx(call, rel=1e-6) and f.per_unit == pytest.approx(rate, rel=1e-6)
    assert calib.calibration_for('cpu') is cal  # installed
    saved = json.loads(open(cal.source).read())
    assert saved['format'] == 'vitfree.calibration' and len(saved['samples']) == 2 * 2 * (3 + 2)

    # the dispatcher now uses the measured costs, labels them, and leaves unmeasured ones out
    q = torch.empty(1, 6, 1 + 64 * 64, 64)
    w = LayerWindows(3, (64, 64))
    est = estimate_costs(q, w, 1)
    work_dense = dispatch.dense_work(q, w, 1)
    assert est['dense'] == pytest.approx(1e-5 + 1e-12 * work_dense)
    assert 'not in the calibration' in estimate_costs(q, LayerWindows(64, (64, 64)), 1)['global']
    text = explain_choice(q, w, 1)
    assert 'measured on cpu' in text and '(measured)' in text
    # a calibration in which tiles are slow flips the choice
    slow = {'dense': (1e-5, 1e-12), 'tiled': (1e-4, 1e-9)}
    measure.calibrate('cpu', ['dense', 'tiled'], TINY, TINY, timer=_fake_timer(slow), progress=None, save=False)
    assert choose_backend(q, w, 1) == 'dense'
    measure.calibrate('cpu', ['dense', 'tiled'], TINY, TINY, timer=_fake_timer(rates), progress=None, save=False)
    assert choose_backend(q, w, 1) == 'tiled'


def test_calibration_with_real_cpu_timings():
    cal = measure.calibrate('cpu', ['dense', 'tiled', 'global'], TINY, None, modes=(False,), progress=None,
                          save=False, install=False)
    for name in ('dense', 'tiled', 'global'):
        f = cal.fits[name]['lowp-infer']
        assert f.samples == 3 and f.call >= 0 and f.per_unit >= 0 and f.predict(1e6) > 0
    assert all('seconds' in s and s['seconds'] > 0 for s in cal.samples)
    assert calib.calibration_for('cpu') is None


def test_lookup_order_cache_then_shipped_and_round_trip(monkeypatch, tmp_path):
    name = 'Fake GPU 80GB'
    fits = {'dense': {'lowp-infer': calib.Fit(1e-5, 1e-12, 3, 0.01)}}
    shipped = calib.Calibration(name, '0.0', '0.0', '2026-01-01T00:00:00Z', fits)
    shipped.save(calib.TABLE_DIR / 'fake-gpu-80gb.json')
    assert [c.device for c in calib.shipped_tables()] == [name]
    assert calib._find(name).created == '2026-01-01T00:00:00Z'
    mine = calib.Calibration(name, '0.0', '0.0', '2026-06-01T00:00:00Z', fits)
    mine.save(calib.cache_path(name))
    assert calib._find(name).created == '2026-06-01T00:00:00Z'  # the user's own measurement wins
    other = tmp_path / 'other.json'
    calib.Calibration(name, '0.0', '0.0', '2027-01-01T00:00:00Z', fits).save(other)
    monkeypatch.setenv(calib.ENV_FILE, str(other))
    assert calib._find(name).created == '2027-01-01T00:00:00Z'
    assert calib._find('Another GPU') is None
    back = calib.Calibration.load(other)
    assert back.fit('dense', torch.bfloat16, False) == fits['dense']['lowp-infer']
    assert back.fit('dense', torch.float32, False) is None and back.fit('dense', torch.float64, False) is None
    bad = tmp_path / 'bad.json'
    bad.write_text('{"format": "other"}')
    with pytest.raises(ValueError, match='not a vitfree calibration'):
        calib.Calibration.load(bad)


class FakeQ:
    shape = torch.Size((1, 6, 1 + 32 * 32, 64))
    dtype = torch.bfloat16
    device = torch.device('cuda', 0)
    requires_grad = False

    def dim(self):
        return 4


def test_uncalibrated_cuda_says_guess(monkeypatch):
    """With a (pretended) CUDA device, no calibration and implicit calibration switched off,
    explain_choice says the costs are guesses."""
    monkeypatch.setenv(calib.ENV_AUTO, '0')
    monkeypatch.setattr(calib, 'device_name', lambda dev: 'Fake GPU')
    for name in list(dispatch._BACKENDS):
        b = dispatch._BACKENDS[name]
        monkeypatch.setitem(dispatch._BACKENDS, name, dataclasses.replace(b, supports=lambda q, w: None, prepare=None))
    monkeypatch.setattr(dispatch, 'choose_backend', lambda q, w, p: 'dense')
    text = explain_choice(FakeQ(), LayerWindows(3, (32, 32)), 1)
    assert 'no calibration for Fake GPU' in text and 'GUESSES' in text and '(guess, not measured)' in text


def test_uncalibrated_cuda_measures_once_and_uses_it(monkeypatch, tmp_path):
    """An uncalibrated GPU is calibrated on its first use (once, saved to the user cache), so the
    choice rests on its own timings; never inside a compile trace; a failed run leaves guesses."""
    monkeypatch.setattr(calib, 'device_name', lambda dev: 'Fake GPU')
    monkeypatch.setattr(calib, '_can_auto_calibrate', lambda: True)
    calls = []
    fits = {'dense': {'lowp-infer': calib.Fit(2e-5, 1e-12, 3, 0.01)}}

    def fake_calibrate(device, **kw):
        calls.append((device, kw))
        cal = calib.Calibration('Fake GPU', '0.0', '0.0', '2026-11-24T00:00:00Z', fits)
        cal.save(calib.cache_path('Fake GPU'))
        return cal
    monkeypatch.setattr(measure, 'calibrate', fake_calibrate)
    with pytest.warns(RuntimeWarning, match='measuring one now'):
        cal = calib.calibration_for(torch.device('cuda', 0))
    assert cal is not None and cal.fit('dense', torch.bfloat16, False) == fits['dense']['lowp-infer']
    assert len(calls) == 1 and calls[0][1]['fp32_shapes'] is None and calls[0][1]['shapes'] == measure.QUICK_SHAPES
    assert calls[0][1]['budget_s'] == calib.AUTO_BUDGET_S and calls[0][1]['save'] is True
    assert calib.calibration_for(torch.device('cuda', 0)) is cal and len(calls) == 1  # once per process
    calib._found.clear()  # a later process finds the saved table without measuring again
    calib._auto_tried.clear()
    assert calib.calibration_for(torch.device('cuda', 0)).created == '2026-11-24T00:00:00Z' and len(calls) == 1
    # only measured backends compete: the dispatcher's costs are labelled measured
    for name in list(dispatch._BACKENDS):
        b = dispatch._BACKENDS[name]
        monkeypatch.setitem(dispatch._BACKENDS, name, dataclasses.replace(b, supports=lambda q, w: None, prepare=None))
    labels = {n: lab for n, (_, lab) in dispatch._estimates(FakeQ(), LayerWindows(3, (32, 32)), 1).items()}
    assert labels['dense'] == 'measured' and 'guess' not in ' '.join(labels.values())

    def broken(device, **kw):
        raise RuntimeError('no kernel image')
    monkeypatch.setattr(measure, 'calibrate', broken)
    monkeypatch.setattr(calib, 'device_name', lambda dev: 'Broken GPU')
    with pytest.warns(RuntimeWarning):
        assert calib.calibration_for(torch.device('cuda', 0)) is None


def test_no_implicit_calibration_when_switched_off_or_compiling(monkeypatch):
    monkeypatch.setenv(calib.ENV_AUTO, 'off')
    assert not calib._can_auto_calibrate()
    monkeypatch.setenv(calib.ENV_AUTO, '1')
    assert calib._can_auto_calibrate()
    monkeypatch.setattr(torch.compiler, 'is_compiling', lambda: True)
    assert not calib._can_auto_calibrate()


def test_cli_writes_tables(tmp_path, monkeypatch):
    monkeypatch.setattr(measure, 'DEFAULT_SHAPES', TINY)
    monkeypatch.setattr(measure, 'QUICK_SHAPES', TINY[:2])
    out = tmp_path / 'out'
    assert measure.main(['--device', 'cpu', '--quick', '--backends', 'dense', 'tiled', '--out', str(out)]) == 0
    table = calib.Calibration.load(out / 'cpu.json')
    assert set(table.fits) == {'dense', 'tiled'}
