"""The benchmark scripts in tiny mode: each prints its markdown table and writes the same rows as JSON
(--json), with the command that produced them, as benchmarks/README.md quotes them."""

import importlib.util
import json
import os
import shlex

import pytest

from conftest import BACKEND, REPO

pytestmark = pytest.mark.once  # backend-independent: `make test` runs it under TensorFlow only


def load_script(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "benchmarks", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_script(name, argv, tmp_path, capsys):
    """Run NAME's main(ARGV --json FILE); returns (the JSON record, stdout, the table's body lines)."""
    path = tmp_path / f"{name}.json"
    returned = load_script(name).main([*argv, "--json", str(path)])
    printed = capsys.readouterr().out
    record = json.loads(path.read_text())
    assert returned == record
    assert record["command"] == "python " + shlex.join([f"benchmarks/{name}.py", *argv, "--json", str(path)])
    assert record["machine"]["cores"] == os.cpu_count()
    assert record["table"] in printed  # the table printed is the one kept
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]  # no temporary file left
    first_table = record["table"].split("\n\n")[0].splitlines()
    assert first_table[1].startswith("|---")
    return record, printed, first_table[2:]


def test_pipeline_rows_match_its_table(tmp_path, capsys):
    record, _, body = run_script(
        "pipeline",
        [
            "--backbone",
            "small_cnn",
            "--images",
            "32",
            "--image-size",
            "32",
            "--batch-size",
            "8",
            "--steps",
            "1",
            "--repeats",
            "1",
        ],
        tmp_path,
        capsys,
    )
    rows = record["rows"]
    assert len(rows) == len(body) == 8
    for row, line in zip(rows, body):
        assert line.startswith(f"| {row['measure']} |")
        assert row["value"] > 0 or row["unit"] == "%"  # a cost may be negative (noise)
    result = record["result"]
    assert result["backend"] == BACKEND and result["images"] == 32
    assert rows[2]["value"] == pytest.approx(
        result["pipeline_images_per_second"] / result["single_thread_images_per_second"]
    )


def test_export_all_rows_match_its_table_and_its_parity_figure_repeats(tmp_path, capsys):
    argv = ["--backbones", "small_cnn"]
    first, _, body = run_script("export_all", argv, tmp_path, capsys)
    (row,) = first["rows"]
    line = (
        f"| small_cnn | 64 | {row['build_seconds']:.1f} | {row['export_seconds']:.1f} "
        f"| {row['megabytes']:.1f} | {row['max_relative_difference']:.1e} |"
    )
    assert body == [line]
    assert row["backend"] == BACKEND and 0 <= row["max_relative_difference"] <= 1e-4
    # seeded weights and seeded parity pixels (kbench.export.onnx.PARITY_SEED): the same figure every run
    (tmp_path / "again").mkdir()
    again, _, _ = run_script("export_all", argv, tmp_path / "again", capsys)
    assert again["rows"][0]["max_relative_difference"] == row["max_relative_difference"]


def test_latency_check_rows_and_ratios(tmp_path, capsys):
    record, printed, body = run_script(
        "latency_check", ["--backbone", "small_cnn", "--runs", "3", "--warmup", "1"], tmp_path, capsys
    )
    runtimes = [row["runtime"] for row in record["rows"]]
    assert runtimes == ["keras-predict", "keras-compiled", "onnxruntime-cpu", "bare session.run loop"]
    assert len(body) == 4 and all(f"| small_cnn | {name} |" in line for name, line in zip(runtimes, body))
    assert all(row["runs"] == 3 and row["p50_ms"] > 0 for row in record["rows"])
    p50 = {row["runtime"]: row["p50_ms"] for row in record["rows"]}
    assert record["checks"][0]["ratio"] == pytest.approx(p50["onnxruntime-cpu"] / p50["bare session.run loop"])
    assert "| kbench onnxruntime-cpu p50 / bare session.run p50 |" in printed


def test_ensemble_head_trains_the_demo_members_and_keeps_its_rows(tmp_path, capsys):
    record, printed, body = run_script(
        "ensemble_head", ["--images", "40", "--member-epochs", "1", "--head-epochs", "1,2"], tmp_path, capsys
    )
    assert [row["head_epochs"] for row in record["rows"]] == [1, 2]
    assert [line.split(" | ")[0] for line in body] == ["| 1", "| 2"]
    assert [m["name"] for m in record["members"]] == ["small_cnn", "small_cnn_40"]  # the demo's stacked pair
    assert record["wall_ratio"] == pytest.approx(record["rows"][1]["wall_seconds"] / record["rows"][0]["wall_seconds"])
    assert f"{record['wall_ratio']:.2f}x" in printed


def test_cpu_backends_rows_match_its_table(tmp_path, capsys):
    record, _, body = run_script(
        "cpu_backends",
        ["--backbones", "small_cnn", "--sizes", "32", "--steps", "1", "--settings", BACKEND],
        tmp_path,
        capsys,
    )
    (row,) = record["rows"]
    assert row["setting"] == BACKEND and row["backend"] == BACKEND and len(row["step_ms"]) == 1
    assert body == [f"| small_cnn | 32 | {row['median_ms']:,.0f} |"]


def test_cpu_backends_bf16_settings_show_their_speed_up_over_float32():
    script = load_script("cpu_backends")
    rows = [
        {"setting": setting, "backbone": "resnet50", "image_size": 96, "median_ms": ms}
        for setting, ms in (("tensorflow", 2700), ("tensorflow-bf16", 2033), ("jax", 5400), ("jax-bf16", 10800))
    ]
    assert script.markdown(rows).splitlines()[-1] == (
        "| resnet50 | 96 | 2,700 | 2,033 (speed-up 1.33) | 5,400 (2.0×) | 10,800 (speed-up 0.50) |"
    )
    assert script.SETTINGS["jax-bf16"] == {"KERAS_BACKEND": "jax"}


@pytest.mark.skipif(BACKEND != "tensorflow", reason="the script runs each backbone in its own TensorFlow process")
def test_backbones_table_rows_plot_and_resume(tmp_path, capsys):
    script = load_script("backbones")
    argv = ["--backbones", "mobilenet_v3_small", "--image-size", "32", "--batch-sizes", "1,2", "--budget-seconds", "1"]
    record, _, body = run_script("backbones", argv, tmp_path, capsys)
    (row,) = record["rows"]
    assert row["backbone"] == "mobilenet_v3_small" and row["max_relative_difference"] <= 1e-4
    assert row["gflops"] < 0.11  # counted at 32 px, not the native size's figure
    for key in ("keras-compiled_b1", "keras-compiled_b2", "onnxruntime-cpu_b1", "onnxruntime-cpu_b2"):
        assert row[f"{key}_ms"] > 0 and row[f"{key}_runs"] >= 1
    assert body == [script.table_line(row, [1, 2])] and "| 68.1 |" in body[0]
    assert (tmp_path / "backbones.png").stat().st_size > 10_000 and record["pareto_front"] == ["mobilenet_v3_small"]
    # --resume keeps the finished row: nothing is measured again
    again = script.main([*argv, "--resume", "--no-plot", "--json", str(tmp_path / "backbones.json")])
    assert again["rows"][0]["export_seconds"] == row["export_seconds"]


def test_backbones_pareto_front_and_refusals():
    script = load_script("backbones")
    points = [(1.0, 70.0, "a"), (2.0, 69.0, "b"), (3.0, 80.0, "c"), (3.0, 75.0, "d"), (9.0, 80.0, "e")]
    assert script.pareto_front(points) == ["a", "c"]
    from kbench.models.backbones import REGISTRY

    assert set(script.TOP1) == {spec.name for spec in REGISTRY.values() if spec.application}
    with pytest.raises(SystemExit):
        script.main(["--backbones", "nope*", "--json", "/dev/null"])


def test_export_graph_rows_match_its_table(tmp_path, capsys):
    argv = ["--backbones", "small_cnn", "--image-size", "32", "--batch-sizes", "1", "--repeats", "1", "--runs", "2"]
    record, _, body = run_script("export_graph", argv, tmp_path, capsys)
    (row,) = record["rows"]
    assert body == [load_script("export_graph").table_line(row)]
    assert row["backbone"] == "small_cnn" and row["batch_size"] == 1 and row["p50_ms_before"] > 0
    assert row["repeats"] == 2  # --repeats 1, rounded up to a pair of rounds
    assert row["after_over_before"] == pytest.approx(row["p50_ms_after"] / row["p50_ms_before"])
    assert row["nodes_after"] <= row["nodes_before"] == sum(row["counts_before"].values())
    assert row["graph_passes"]["simplifier"].startswith("onnxslim") and row["max_relative_difference"] <= 1e-4
    assert row["p50_ms_timm"] == "not available"  # timm has no small_cnn, peer environment or not


def test_interleaved_p50_balances_the_order_over_each_pair_of_rounds(capsys):
    """Each pair of rounds runs one order and then its reverse, rotated from pair to pair: every variant's
    mean position is the same in each pair (with 3 rotated rounds "before" went first twice in three).
    An odd --repeats is rounded up, and says so."""
    script = load_script("export_graph")
    calls = []

    class Fake:
        def __init__(self, name):
            self.name = name

        def run(self, outputs, feed):
            calls.append(self.name)

    names = ["a", "b", "c"]
    script.interleaved_p50({name: Fake(name) for name in names}, dict.fromkeys(names, {}), repeats=6, runs=1)
    rounds = [calls[3 + 6 * index : 3 + 6 * (index + 1) : 2] for index in range(6)]  # warm-ups, then call + run
    assert rounds == [list("abc"), list("cba"), list("bca"), list("acb"), list("cab"), list("bac")]
    args = script.argparse.Namespace(repeats=3)
    script.record.even_repeats(args)
    assert args.repeats == 4 and "--repeats 3 → 4" in capsys.readouterr().err


def counted_sessions(real):
    """``real`` wrapped to count the sessions it opens: (wrapper, [opened], [most alive at once])."""
    import weakref

    opened, alive, most = [0], [0], [0]

    def counted(*args, **kwargs):
        made = real(*args, **kwargs)
        opened[0] += 1
        alive[0] += 1
        most[0] = max(most[0], alive[0])
        weakref.finalize(made, lambda: alive.__setitem__(0, alive[0] - 1))
        return made

    return counted, opened, most


def test_export_graph_one_session_and_session_options(tmp_path, capsys):
    """--one-session never has two ONNX Runtime sessions alive, for the variants or the session
    options; --session-options adds its table (it once sat after a return and did nothing, exit 0)."""
    import gc

    script = load_script("export_graph")
    script.session, opened, most = counted_sessions(script.session)
    gc.collect()
    argv = ["--backbones", "small_cnn", "--image-size", "32", "--batch-sizes", "1", "--repeats", "2", "--runs", "2"]
    record = script.main([*argv, "--one-session", "--session-options", "--json", str(tmp_path / "g.json")])
    capsys.readouterr()
    (row,) = record["rows"]
    assert row["one_session"] is True and row["p50_ms_before"] > 0 and row["p50_ms_after"] > 0
    assert most[0] == 1 and opened[0] == 2 * 2 + 2 * len(script.SESSION_VARIANTS)  # one per turn
    labels = [option["session_options"] for option in record["session_options"]]
    assert labels == list(script.SESSION_VARIANTS)
    assert all(option["p50_ms"] > 0 for option in record["session_options"])
    assert "| kbench's settings, spinning off | 1 |" in record["table"]


def test_export_graph_refuses_before_measuring(tmp_path):
    script = load_script("export_graph")
    both = ["--backbones", "small_cnn", "--counts-only", "--session-options"]
    for wrong in (["--backbones", "small_cnn,nope"], both):
        with pytest.raises(SystemExit) as stopped:
            script.main([*wrong, "--json", str(tmp_path / "x.json")])
        assert stopped.value.code == 2 and not (tmp_path / "x.json").exists()


def test_export_graph_names_the_backbone_whose_export_failed(tmp_path):
    """Each backbone exports in a child process; its failure comes back as one line naming it."""
    with pytest.raises(SystemExit) as stopped:
        load_script("export_graph").main(
            ["--backbones", "small_cnn", "--image-size", "8", "--counts-only", "--json", str(tmp_path / "x.json")]
        )
    assert str(stopped.value.code).startswith("small_cnn: KbenchError: ") and "8" in str(stopped.value.code)


def test_child_failures_come_back_in_one_line_naming_the_model():
    import sys

    record = load_script("record")
    python = [sys.executable, "-c"]
    assert record.child_result([*python, "print('noise'); print('[1, 2]')"], "m") == [1, 2]
    cases = {
        "import os, signal; os.kill(os.getpid(), signal.SIGKILL)": (
            "m: its process was killed by SIGKILL (signal 9) (out of memory?)"
        ),
        "import os, signal; os.kill(os.getpid(), signal.SIGTERM)": "m: its process was killed by SIGTERM (signal 15)",
        "import sys; sys.exit('boom')": "m: its process exited 1: boom",
        'print(\'{"error": "KbenchError: too small"}\')': "m: KbenchError: too small",
        "print('no json')": "m: its process exited 0: no output",
    }
    for code, message in cases.items():
        with pytest.raises(SystemExit) as stopped:
            record.child_result([*python, code], "m")
        assert str(stopped.value.code) == message


def test_export_graph_counts_only_times_nothing(tmp_path, capsys):
    argv = ["--backbones", "small_cnn", "--image-size", "32", "--counts-only"]
    record, _, body = run_script("export_graph", argv, tmp_path, capsys)
    (row,) = record["rows"]
    assert body == [load_script("export_graph").counts_line(row)]
    assert "p50_ms_before" not in row and row["nodes_after"] <= row["nodes_before"]
    assert row["max_relative_difference"] <= 1e-4


@pytest.mark.parametrize("one_session", [[], ["--one-session"]])
def test_pass_ablation_rows_match_its_table(tmp_path, capsys, one_session):
    """Each backbone in a process of its own: the rows come back through it, as the table prints them."""
    argv = ["--without", "read_input_channels_last", "--backbones", "small_cnn", "--image-size", "32"]
    argv += ["--batch-sizes", "1", "--repeats", "1", "--runs", "2", *one_session]
    record, _, body = run_script("pass_ablation", argv, tmp_path, capsys)
    (row,) = record["rows"]
    assert body == [load_script("pass_ablation").table_line(row)]
    assert row["rewrites"] == 1  # small_cnn's first convolution reads the NHWC input directly
    assert row["parity_all"] <= 1e-4 and row["parity_without"] <= 1e-4
    assert row["all_over_without"] == pytest.approx(row["p50_ms_all"] / row["p50_ms_without"])
    for wrong in (["--without", "nope"], ["--without", "drop_dead_nodes", "--backbones", "small_cnn,nope"]):
        with pytest.raises(SystemExit) as stopped:
            load_script("pass_ablation").main([*wrong, "--json", str(tmp_path / "x.json")])
        assert stopped.value.code == 2 and not (tmp_path / "x.json").exists()


def test_pass_ablation_one_session_keeps_one_session_alive(tmp_path, capsys, monkeypatch):
    """--one-session: the parity check and every turn of the timing open one session at a time (B7's
    two sessions at batch 32 were killed for memory)."""
    import gc

    script = load_script("pass_ablation")
    from benchmarks import export_graph

    counted, opened, most = counted_sessions(export_graph.session)
    monkeypatch.setattr(export_graph, "session", counted)
    gc.collect()
    argv = ["--without", "read_input_channels_last", "--backbones", "small_cnn", "--image-size", "32"]
    script.main([*argv, "--batch-sizes", "1", "--repeats", "2", "--runs", "2", "--one-session", "--one"])
    (row,) = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert row["p50_ms_all"] > 0 and row["p50_ms_without"] > 0
    assert most[0] == 1 and opened[0] == 2 + 2 * 2  # parity, then one per turn


def test_openvino_bench_rows_match_its_table(tmp_path, capsys):
    argv = [
        "--backbones",
        "small_cnn",
        "--batch-sizes",
        "1",
        "--rounds",
        "2",
        "--runs",
        "2",
        "--int8-backbones",
        "none",
    ]
    argv += ["--calibration-images", "4", "--small-cnn-epochs", "1", "--export-dir", str(tmp_path / "files")]
    record, _, body = run_script("openvino_bench", argv, tmp_path, capsys)
    assert [row["runtime"] for row in record["rows"]] == ["onnxruntime-cpu", "openvino-cpu", "openvino-cpu-bf16"]
    assert len(body) == 3 and all(row["parity_with_keras"] <= 5e-2 for row in record["rows"] if row["status"] == "ok")
    (trained,) = record["int8"]
    assert trained["model"] == "small_cnn (trained)" and trained["float_val_log_loss"] > 0
    assert len(trained["candidates"]) == 4 and "| small_cnn (trained) | float |" in record["table"]


def test_results_are_grouped_by_page_and_every_link_to_them_resolves():
    import re

    record = load_script("record")
    results, docs = os.path.join(REPO, "benchmarks", "results"), os.path.join(REPO, "benchmarks", "docs")
    pages = {name[: -len(".md")] for name in os.listdir(docs) if name.endswith(".md")}
    assert not [name for name in os.listdir(results) if os.path.isfile(os.path.join(results, name))]
    assert set(os.listdir(results)) <= pages
    assert set(record.PAGES.values()) <= pages
    assert os.path.dirname(record.default_json("pass_ablation")) == os.path.join(results, "export-graph")
    for folder, text in [
        (os.path.join(REPO, "benchmarks"), open(os.path.join(REPO, "benchmarks", "README.md")).read())
    ] + [(docs, open(os.path.join(docs, name)).read()) for name in sorted(os.listdir(docs)) if name.endswith(".md")]:
        for link in re.findall(r"\]\(((?:\.\./)?results/[^)#]+)\)", text):
            assert os.path.exists(os.path.normpath(os.path.join(folder, link))), link
