"""The analysis report: :func:`analyze` runs the analyses of one model on a few images and writes
PNGs, ``results.json`` and one self-contained HTML page.

``orchestrate``  :func:`analyze` and one function per part of the page
``html``         page writing (self-contained: pictures inlined, no scripts, no network)

The pictures come from :mod:`vitfree.analysis.plots`, which the recorder, the ERF command and
the demo use too.
"""
from .orchestrate import PART_TITLES, PARTS, AnalysisReport, ReportOptions, analyze
from .html import write_html
from ..inputs import load_images

__all__ = ['PARTS', 'PART_TITLES', 'AnalysisReport', 'ReportOptions', 'analyze', 'load_images', 'write_html']
