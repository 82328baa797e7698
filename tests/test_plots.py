"""The loss plots are drawn outside pyplot: a notebook's backend and open figures stay as they were."""

from __future__ import annotations

import matplotlib
import matplotlib.pyplot as plt

from jaxft.plots import plot_values


def test_plots_leave_the_callers_backend_and_figures_alone(tmp_path):
    previous = matplotlib.get_backend()
    matplotlib.use("svg")
    try:
        mine = plt.figure()
        paths = plot_values(2, 100, [1.0, 0.5, 0.3], [1.1, 0.6, 0.4], tmp_path)
        assert matplotlib.get_backend() == "svg" and plt.get_fignums() == [mine.number]
        assert [p.name for p in paths] == ["loss-plot.pdf", "loss-plot.png"]
        assert paths[0].read_bytes().startswith(b"%PDF") and paths[1].read_bytes().startswith(b"\x89PNG")
        assert sorted(p.name for p in tmp_path.iterdir()) == ["loss-plot.pdf", "loss-plot.png"]  # no temporaries
        plt.close(mine)
    finally:
        matplotlib.use(previous)
