"""Cost tables: the fit, a calibration run (with a fake clock, and with real CPU timings on tiny
shapes), the stored tables and their lookup per device, how the dispatcher uses and labels them,
and that nothing ever measures implicitly."""
import json

import pytest
import torch

import vitfree.ops.calibrate as measure
import vitfree.ops.calibration as calib
import vitfree.ops.dispatch as dispatch
from vitfree.ops import choose_backend, estimate_costs, explain_choice, get_backend, make_query
from vitfree.windows import LayerWindows

pytestmark = pytest.mark.usefixtures('one_thread')

TINY = (((6, 6), 1, 1), ((8, 8), 2, 1), ((10, 10), 1, 2))


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, tmp_path):
    monkeypatch.setenv('VITFREE_CACHE_DIR', str(tmp_path / 'cache'))
    monkeypatch.delenv(calib.ENV_FILE, raising=False)
    shipped = tmp_path / 'shipped'
    shipped.mkdir()
    for name in ('defaults-cpu.json', 'defaults-cuda.json'):
        (shipped / name).write_text((calib.TABLE_DIR / name).read_text())
    monkeypatch.setattr(calib, 'TABLE_DIR', shipped)
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    calib._found.clear()
    yield
    calib._installed.clear()
    calib._found.clear()
    calib._version[0] += 1


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
    """A clock where backend ``name`` takes ``call + rate * work`` seconds."""
    def timer(fn):
        call, rate = rates[fn.backend]
        return call + rate * fn.work
    return timer


def test_calibration_with_a_fake_clock_drives_the_choice():
    rates = {'dense': (1e-5, 1e-12), 'tiled': (1e-4, 1e-13)}
    cal = measure.calibrate('cpu', ['dense', 'tiled'], TINY, TINY[:2], timer=_fake_timer(rates), progress=None)
    assert cal.device == calib.device_name('cpu') and cal.measured and set(cal.backends()) == {'dense', 'tiled'}
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
    work_dense = get_backend('dense').work(make_query(q, w.grid, 1, 6, 64), w)
    assert est['dense'] == pytest.approx(1e-5 + 1e-12 * work_dense)
    assert 'no cost for it in the table' in estimate_costs(q, LayerWindows(64, (64, 64)), 1)['global']
    text = explain_choice(q, w, 1)
    assert f'measured on {cal.device}' in text and '(measured)' in text
    # a table in which tiles are slow flips the choice
    slow = {'dense': (1e-5, 1e-12), 'tiled': (1e-4, 1e-9)}
    measure.calibrate('cpu', ['dense', 'tiled'], TINY, TINY, timer=_fake_timer(slow), progress=None, save=False)
    assert choose_backend(q, w, 1) == 'dense'
    measure.calibrate('cpu', ['dense', 'tiled'], TINY, TINY, timer=_fake_timer(rates), progress=None, save=False)
    assert choose_backend(q, w, 1) == 'tiled'


def test_calibration_with_real_cpu_timings():
    cal = measure.calibrate('cpu', ['dense', 'tiled', 'global', 'native'], TINY, None, modes=(False,),
                            progress=None, save=False, install=False)
    for name in ('dense', 'tiled', 'global', 'native'):
        f = cal.fits[name]['lowp-infer']
        assert f.samples == 3 and f.call >= 0 and f.per_unit >= 0 and f.predict(1e6) > 0
    assert all('seconds' in s and s['seconds'] > 0 for s in cal.samples)
    assert not calib.calibration_for('cpu').measured  # not installed: the defaults still apply


def test_lookup_order_installed_env_cache_shipped_defaults(monkeypatch, tmp_path):
    name = calib.device_name('cpu')
    fits = {'dense': {'lowp-infer': calib.Fit(1e-5, 1e-12, 3, 0.01)}}
    assert calib.calibration_for('cpu').device == 'any CPU'  # nothing else: the shipped defaults
    shipped = calib.Calibration(name, '0.0', '0.0', '2026-01-01T00:00:00Z', fits)
    shipped.save(calib.TABLE_DIR / f'{calib.slug(name)}.json')
    assert [c.device for c in calib.shipped_tables()] == [name]  # the defaults are not listed
    assert calib._find(name).created == '2026-01-01T00:00:00Z'
    mine = calib.Calibration(name, '0.0', '0.0', '2026-06-01T00:00:00Z', fits)
    mine.save(calib.cache_path(name))
    assert calib._find(name).created == '2026-06-01T00:00:00Z'  # the user's own measurement wins
    other = tmp_path / 'other.json'
    calib.Calibration(name, '0.0', '0.0', '2027-01-01T00:00:00Z', fits).save(other)
    monkeypatch.setenv(calib.ENV_FILE, str(other))
    assert calib._find(name).created == '2027-01-01T00:00:00Z'
    assert calib._find('Another CPU [avx2]') is None
    back = calib.Calibration.load(other)
    assert back.fit('dense', 'lowp', False) == fits['dense']['lowp-infer']
    assert back.fit('dense', 'fp32', False) is None and back.fit('dense', None, False) is None
    bad = tmp_path / 'bad.json'
    bad.write_text('{"format": "other"}')
    with pytest.raises(ValueError, match='not a vitfree calibration'):
        calib.Calibration.load(bad)


def test_cpu_tables_are_named_by_model_and_vector_extension(monkeypatch):
    real_info = calib._cpuinfo
    monkeypatch.setattr(calib, '_cpuinfo', lambda: ('Some CPU 9000', {'avx2', 'fma'}))
    assert calib.device_name('cpu') == 'Some CPU 9000 [avx2]'
    monkeypatch.setattr(calib, '_cpuinfo', lambda: ('Some CPU 9000', {'avx2', 'avx512f'}))
    assert calib.device_name('cpu') == 'Some CPU 9000 [avx512]'
    monkeypatch.setattr(calib, '_cpuinfo', real_info)
    real = calib.device_name('cpu')
    assert real.endswith((' [avx512]', ' [avx2]', ' [neon]', ' [generic]'))
    if 'cpu family' in open('/proc/cpuinfo').read():
        assert '(family ' in real and ' model ' in real  # one name per CPU generation, not per vendor string
    assert calib.slug('Some CPU 9000 [avx512]') == 'some-cpu-9000-avx512'


def test_a_forward_pass_never_measures(monkeypatch):
    """The dispatcher only reads tables; the measuring tool is never called from a forward pass."""
    called = []
    monkeypatch.setattr(measure, 'calibrate', lambda *a, **k: called.append(1))
    q, k, v = (torch.randn(1, 2, 1 + 49, 8) for _ in range(3))
    dispatch.window_attention(q, k, v, LayerWindows(1, (7, 7)), 1)
    assert called == []


def test_cuda_default_table_is_labelled_as_not_measured(monkeypatch):
    monkeypatch.setattr(calib, 'device_name', lambda d: 'Fake GPU' if torch.device(d).type == 'cuda' else 'cpu')
    cal = calib.calibration_for(torch.device('cuda', 0))
    assert not cal.measured and 'guesses' in cal.note and 'shipped defaults' in cal.describe()


def test_cli_writes_tables(tmp_path, monkeypatch):
    from vitfree.cli import main
    monkeypatch.setattr(measure, 'QUICK_SHAPES', TINY[:2])
    out = tmp_path / 'out'
    assert main(['calibrate', '--device', 'cpu', '--quick', '--backends', 'dense', 'tiled', '--out', str(out)]) == 0
    table = calib.Calibration.load(out / f'{calib.slug(calib.device_name("cpu"))}.json')
    assert set(table.fits) == {'dense', 'tiled'} and table.measured
    assert main(['calibrate', '--threads', '0']) == 2
