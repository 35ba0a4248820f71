"""The scaling sweep's plot (`bench.plot`): what its legends say, the order of its lines, its x ticks, and
that no legend hides a panel or its tick labels.

The rows are made up here: model names whose alphabetical order is not their size order, sequence lengths
whose string order is not their numeric order ("1024" < "256"), a history length the same in every row and
two meshes of 1 and 2 devices.
"""

from __future__ import annotations

import pytest

from nextquill_jax.bench import plot, sweep

MODELS = {"alpha": 3_000_000, "beta": 100_000, "gamma": 400_000}  # name -> parameters
BY_SIZE = ["beta", "gamma", "alpha"]
SEQ_LENS = ["256", "1024"]
MESHES = {"data=1,fsdp=1,tensor=1": "1", "data=1,fsdp=2,tensor=1": "2"}  # mesh -> devices


def row(model: str, seq_len: str, mesh: str) -> dict[str, str]:
    """A CSV row of the sweep's columns: the key (history 2) and the plotted numbers set, the rest empty
    (CPU: no MFU, no device peak)."""
    params = MODELS[model]
    return {
        **dict.fromkeys(sweep.CSV_COLUMNS, ""),
        "model": model, "params": str(params), "seq_len": seq_len, "history": "2", "mesh": mesh,
        "devices": MESHES[mesh], "tokens_per_s": f"{1e9 / params:.1f}",
        "compiled_total_mib": f"{params / 1e4:.2f}", "tflops_per_s": f"{int(seq_len) * 1e-4:.4f}",
        "backend": "cpu", "device_kind": "cpu",
    }  # fmt: skip


ROWS = [row(m, s, mesh) for m in MODELS for s in SEQ_LENS for mesh in MESHES]


@pytest.fixture(scope="module")
def drawn():
    """The figure of ROWS, drawn once (layout and text extents exist after a draw), and its renderer."""
    fig = plot.scaling_figure(ROWS, "scaling.csv")
    fig.canvas.draw()
    return fig, fig.canvas.get_renderer()


def panel_rows(fig):
    """The figure's axes as rows of three panels, top to bottom."""
    return [fig.axes[i : i + 3] for i in range(0, len(fig.axes), 3)]


def legend_labels(panels) -> list[str]:
    """The labels of the legend of a row of panels, wherever in the row it is."""
    (legend,) = [ax.get_legend() for ax in panels if ax.get_legend() is not None]
    return [t.get_text() for t in legend.get_texts()]


def test_legend_labels_name_only_what_varies(drawn):
    fig, _ = drawn
    # per row of panels, the other variables that take more than one value in ROWS (history never does)
    varying = [["seq_len", "mesh"], ["model", "mesh"], ["model", "seq_len"]]
    for panels, names in zip(panel_rows(fig), varying, strict=True):
        labels = legend_labels(panels)
        # one line per combination of the two
        assert len(labels) == len(set(labels)) == len({tuple(r[n] for n in names) for r in ROWS})
        for label in labels:
            # ", " parts: a mesh's own commas have no space after them
            assert [part.split("=")[0] for part in label.split(", ")] == names, label
    assert fig.get_suptitle().endswith("\nthe same for every line: history=2")


def test_lines_follow_size_order_with_colours(drawn):
    fig, _ = drawn
    params_row, seq_row, devices_row = panel_rows(fig)
    expected = [
        (params_row, [f"seq_len={s}, mesh={m}" for s in SEQ_LENS for m in MESHES]),
        (seq_row, [f"model={n}, mesh={m}" for n in BY_SIZE for m in MESHES]),
        (devices_row, [f"model={n}, seq_len={s}" for n in BY_SIZE for s in SEQ_LENS]),
    ]
    for panels, labels in expected:
        for ax in panels:
            lines = ax.get_lines()
            assert [line.get_label() for line in lines] == labels
            # colours follow size, the same in each panel of a row
            assert [line.get_color() for line in lines] == [f"C{i}" for i in range(len(labels))]
        assert legend_labels(panels) == labels


def test_x_ticks_are_the_swept_values(drawn):
    fig, _ = drawn
    params_row, seq_row, devices_row = panel_rows(fig)
    # history takes one value: no row of panels for it
    ticks = [
        (params_row, "model parameters", [1e5, 4e5, 3e6], ["100k\nbeta", "400k\ngamma", "3M\nalpha"], "log"),
        (seq_row, "sequence length (with stream)", [256, 1024], ["256", "1024"], "log"),
        (devices_row, "devices", [1, 2], ["1", "2"], "linear"),
    ]
    for panels, x_label, values, labels, scale in ticks:
        assert [ax.get_ylabel() for ax in panels] == ["tokens/s", "memory MiB", "TFLOP/s"]
        for ax in panels:
            assert (ax.get_xlabel(), ax.get_xscale()) == (x_label, scale)
            assert list(ax.get_xticks()) == pytest.approx(values, rel=1e-12)
            assert [t.get_text() for t in ax.get_xticklabels()] == labels
            assert len(ax.xaxis.get_minorticklocs()) == 0  # no 3×10² between 256 and 512


def test_legends_hide_no_panel_and_fit_the_figure(drawn):
    fig, renderer = drawn
    legends = [ax.get_legend() for ax in fig.axes if ax.get_legend() is not None]
    assert len(legends) == 3  # one per row of panels
    boxes = [legend.get_window_extent(renderer) for legend in legends]
    for box in boxes:
        for ax in fig.axes:  # the plotting area, and the tick labels and axis labels beside it
            for other in (ax.get_window_extent(renderer), ax.xaxis.get_tightbbox(renderer),
                          ax.yaxis.get_tightbbox(renderer)):  # fmt: skip
                assert not box.overlaps(other), (box, other)
        assert (
            fig.bbox.x0 <= box.x0
            and box.x1 <= fig.bbox.x1
            and fig.bbox.y0 <= box.y0
            and box.y1 <= fig.bbox.y1
        )
    for i, box in enumerate(boxes):
        assert not any(box.overlaps(other) for other in boxes[i + 1 :])


def test_one_line_has_no_legend_and_the_title_names_the_settings():
    rows = [row(m, "256", "data=1,fsdp=1,tensor=1") for m in MODELS]
    fig = plot.scaling_figure(rows, "scaling.csv")
    assert len(fig.axes) == 3 and all(ax.get_legend() is None for ax in fig.axes)
    assert len(fig.axes[0].get_lines()) == 1
    assert fig.get_suptitle() == (
        "NextQuill training step scaling (cpu; scaling.csv)\n"
        "the same for every line: seq_len=256, history=2, mesh=data=1,fsdp=1,tensor=1"
    )


def test_each_line_runs_through_its_groups_rows_in_ascending_x():
    """ROWS lists the models alphabetically (alpha 3M, beta 100k, gamma 400k): a line of the parameters row
    joins its group's points left to right, each at the row's own numbers (tokens/s = 1e9 / parameters)."""
    fig = plot.scaling_figure(ROWS, "scaling.csv")
    params_row = panel_rows(fig)[0]
    xs = [1e5, 4e5, 3e6]
    for line in params_row[0].get_lines():
        assert list(line.get_xdata()) == xs, line.get_label()
        assert list(line.get_ydata()) == pytest.approx([1e9 / x for x in xs], rel=1e-3)


def test_a_group_without_a_metric_draws_no_line_there_and_the_others_keep_their_colours():
    """MFU known for every row but beta's: the MFU panels draw no beta line, and each other line keeps the
    colour of its group (the one it has in the tokens/s panel), not the next free one."""
    rows = [{**r, "mfu": "" if r["model"] == "beta" else "0.5"} for r in ROWS]
    fig = plot.scaling_figure(rows, "scaling.csv")
    seq_row = panel_rows(fig)[1]  # lines per (model, mesh), models in size order: beta, gamma, alpha
    colours = {line.get_label(): line.get_color() for line in seq_row[0].get_lines()}
    assert list(colours.values()) == [f"C{i}" for i in range(6)]
    assert seq_row[2].get_ylabel() == "MFU"
    mfu = {line.get_label(): line.get_color() for line in seq_row[2].get_lines()}
    assert list(mfu) == [f"model={n}, mesh={m}" for n in ("gamma", "alpha") for m in MESHES]
    assert mfu == {label: colours[label] for label in mfu}


def test_value_ranks_break_ties_by_the_numbers_in_the_names():
    """Two meshes of 10 devices: "data=2,fsdp=5" before "data=10,fsdp=1" (2 < 10; as text, "1" < "2")."""
    rows = [
        {"mesh": "data=10,fsdp=1", "devices": "10"},
        {"mesh": "data=2,fsdp=5", "devices": "10"},
        {"mesh": "data=1,fsdp=1", "devices": "1"},
    ]
    assert plot.value_ranks(rows, "devices", "mesh") == {
        "data=1,fsdp=1": 0,
        "data=2,fsdp=5": 1,
        "data=10,fsdp=1": 2,
    }
    assert sorted(["tiny-128", "tiny-32", "tiny-4"], key=plot.natural_key) == [
        "tiny-4",
        "tiny-32",
        "tiny-128",
    ]


@pytest.mark.parametrize(
    ("n", "label"),
    [
        (512.0, "512"),  # x_ticks passes the CSV's numbers as floats
        (999, "999"),
        (1_000, "1k"),
        (90_400, "90.4k"),
        (999_000, "999k"),
        (999_499, "999k"),
        # rounded up to the next unit's 1 (999.5k shown to 3 digits was "1e+03k")
        (999_500, "1M"),
        (999_999_999, "1B"),
        (1_000_000, "1M"),
        (1_024_000, "1.02M"),
        (1e9, "1B"),
        (7_620_000_000, "7.62B"),
        (999_500_000_000, "1T"),
        (1.5e12, "1.5T"),
        (2e15, "2e+03T"),  # past the largest unit
    ],
)
def test_count_label_at_and_between_its_unit_thresholds(n, label):
    assert plot.count_label(n) == label


def test_a_single_point_still_draws_its_row_of_panels():
    """Nothing varies: one row of panels against the model's parameters, its title naming every setting."""
    fig = plot.scaling_figure([row("beta", "256", "data=1,fsdp=1,tensor=1")], "one.csv")
    assert len(fig.axes) == 3 and fig.axes[0].get_xlabel() == "model parameters"
    assert fig.get_suptitle().endswith(
        "the same for every line: model=beta, seq_len=256, history=2, mesh=data=1,fsdp=1,tensor=1"
    )


def test_a_measured_device_peak_is_the_memory_plotted_and_every_device_kind_is_named():
    """Where the device kept allocator statistics (device_peak_mib), memory is that peak, not the compiled
    estimate; the title names every device kind of the CSV, in order."""
    rows = [{**r, "device_peak_mib": f"{float(r['params']) / 1e3:.1f}"} for r in ROWS]
    rows[0] = {**rows[0], "device_kind": "cpu-b"}
    fig = plot.scaling_figure(rows, "scaling.csv")
    memory = panel_rows(fig)[0][1]
    assert memory.get_ylabel() == "memory MiB"
    for line in memory.get_lines():
        assert list(line.get_ydata()) == pytest.approx([1e5 / 1e3, 4e5 / 1e3, 3e6 / 1e3])
    assert fig.get_suptitle().startswith("NextQuill training step scaling (cpu, cpu-b; scaling.csv)")


def test_a_legend_of_more_than_legend_rows_entries_takes_more_columns():
    """13 models at 2 sequence lengths: the sequence-length row's legend has 13 entries, 12 to a column."""
    models = {f"m{i}": 100_000 * (i + 1) for i in range(13)}
    rows = [
        {**row("beta", s, "data=1,fsdp=1,tensor=1"), "model": m, "params": str(n)}
        for m, n in models.items()
        for s in SEQ_LENS
    ]
    fig = plot.scaling_figure(rows, "scaling.csv")
    legends = [ax.get_legend() for ax in panel_rows(fig)[1] if ax.get_legend() is not None]
    assert len(legends) == 1 and len(legends[0].get_texts()) == 13 and legends[0]._ncols == 2


def test_models_of_one_parameter_count_share_a_tick_naming_both():
    rows = [*ROWS, *(dict(r, model="beta2") for r in ROWS if r["model"] == "beta")]
    xs, labels = plot.x_ticks(rows, "params")
    assert xs == [1e5, 4e5, 3e6] and labels == ["100k\nbeta, beta2", "400k\ngamma", "3M\nalpha"]
