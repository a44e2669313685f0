"""sparsebench-report on a sweep directory laid out as Hydra and experiment.run write it."""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from PIL import Image

from sparsebench import report
from tests.conftest import ROOT

PNG = re.compile(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'")


def make_job(
    sweep: Path,
    num: int,
    sparsity: float,
    bits: int,
    *,
    metrics: bool = True,
    speedups: bool = True,
    status: str = "ok",
) -> Path:
    """One job folder: .hydra/overrides.yaml + config.yaml, and (unless it 'died') metrics.json + layers.csv.

    Numbers follow a simple model of a compressed net so each job's values are distinct and known.
    """
    job = sweep / f"{num}_prune.final_sparsity={sparsity},quant.bits={bits}"
    (job / ".hydra").mkdir(parents=True)
    overrides = [f"prune.final_sparsity={sparsity}", f"quant.bits={bits}", "logger=none"]
    (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    config = {"prune": {"method": "agp", "final_sparsity": sparsity}, "quant": {"method": "linear", "bits": bits}}
    (job / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    if not metrics:
        return job
    dense, footprint = 100_000, int(100_000 * (1 - sparsity) * bits / 32 * 1.5)
    m = {
        "status": status,
        "acc_dense": 0.98,
        "acc_final": round(0.98 - sparsity**4 * (8 / bits) * 0.05, 4),
        "sparsity": sparsity,
        "weight_bits": bits,
        "dense_bytes": dense,
        "footprint_bytes": footprint,
        "compression": dense / footprint,
        "macs_kept": round(1.05 - sparsity, 2),
        "runtime_s": 1.5,
        "bench/backend": "direct_sparse",
    }
    if speedups:
        m["speedup/cudnn_fp32/b1"] = round(1 / (1 - sparsity) * 0.4, 3)
        m["speedup/cudnn_fp16/b1"] = round(1 / (1 - sparsity) * 0.1, 3)
    if status != "ok":
        m = {"status": status, "error": "RuntimeError: CUDA out of memory"}
    (job / "metrics.json").write_text(json.dumps(m))
    rows = []
    for i, layer in enumerate(["conv1", "conv2", "fc"]):
        for backend in ("direct_sparse", "cudnn_fp32", "cudnn_fp16"):
            row = {"layer": layer, "kind": "conv2d", "backend": backend, "batch": 1, "time_us": 10 + i}
            if speedups:
                own = backend == "direct_sparse"
                row["speedup_vs_cudnn_fp32"] = round((i + 1) * sparsity, 3) if own else 1.0
                row["speedup_vs_cudnn_fp16"] = round((i + 1) * sparsity / 4, 3) if own else 0.5
            rows.append(row)
    with open(job / "layers.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return job


@pytest.fixture
def grid(tmp_path: Path) -> Path:
    """A 2 x 2 sparsity x bits sweep plus one job that died without metrics.json."""
    num = 0
    for sparsity in (0.5, 0.9):
        for bits in (4, 8):
            make_job(tmp_path, num, sparsity, bits)
            num += 1
    make_job(tmp_path, num, 0.95, 2, metrics=False)
    return tmp_path


def read_summary(path: Path) -> list:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def images(page: str) -> list:
    return [Image.open(io.BytesIO(base64.b64decode(b))) for b in PNG.findall(page)]


def test_summary_has_one_row_per_job_with_its_numbers(grid: Path) -> None:
    report.write_report(grid)
    rows = read_summary(grid / "summary.csv")
    assert [r["num"] for r in rows] == ["0", "1", "2", "3", "4"]
    assert [r["status"] for r in rows] == ["ok"] * 4 + ["failed"]
    for column in (
        "overrides",
        "acc_dense",
        "acc_final",
        "sparsity",
        "bits",
        "method",
        "footprint_bytes",
        "compression",
        "speedup/cudnn_fp32/b1",
        "speedup/cudnn_fp16/b1",
        "status",
        "error",
        "prune.final_sparsity",
        "quant.bits",
    ):
        assert column in rows[0], column
    assert "logger" not in rows[0]  # the same in every job: not a swept column
    # Job 3 (0.9 sparsity, 8 bits): the values of its own metrics.json.
    metrics = json.loads(next(grid.glob("3_*/metrics.json")).read_text())
    assert float(rows[3]["acc_final"]) == pytest.approx(metrics["acc_final"])
    assert float(rows[3]["speedup/cudnn_fp32/b1"]) == pytest.approx(metrics["speedup/cudnn_fp32/b1"])
    assert (rows[3]["method"], rows[3]["bits"], rows[3]["prune.final_sparsity"]) == ("agp+linear", "8", "0.9")
    # The job that died: failed, with what it was meant to be.
    assert rows[4]["error"] == report.DIED
    assert (rows[4]["bits"], rows[4]["target_sparsity"], rows[4]["acc_final"]) == ("2", "0.95", "")


def test_report_page_is_self_contained_with_every_plot(grid: Path) -> None:
    parts = report.write_report(grid)
    page = (grid / "report.html").read_text()
    titles = [p.title for p in parts]
    assert titles[:3] == [
        "Accuracy vs sparsity, per bit-width",
        "Whole-network speedup vs sparsity, per baseline",
        "Accuracy-speedup Pareto front",
    ]
    assert [t for t in titles if t.startswith("Per-layer speedup")] == [
        "Per-layer speedup: direct_sparse vs cudnn_fp16, batch 1",
        "Per-layer speedup: direct_sparse vs cudnn_fp32, batch 1",
    ]
    assert titles[-2:] == ["Weight footprint", "Test accuracy per epoch, dense training and retraining"]
    assert "No job wrote history.jsonl" in parts[-1].note and html.escape(parts[-1].note) in page
    pngs = images(page)
    assert len(pngs) == len(parts) - 1 == 6 and all(p.format == "PNG" and p.width > 300 for p in pngs)
    files = sorted((grid / "plots").glob("*.png"))  # the same figures as files, in page order
    assert [f.name for f in files][:3] == [
        "01-accuracy-vs-sparsity-per-bit-width.png",
        "02-whole-network-speedup-vs-sparsity-per-baseline.png",
        "03-accuracy-speedup-pareto-front.png",
    ]
    assert [f.read_bytes() for f in files] == [p.png for p in parts if p.png]
    assert not re.search(r"(src|href)=['\"](?!data:)", page)  # nothing fetched from elsewhere
    assert "CUDA out of memory" not in page and report.DIED in page  # failed jobs listed with their reason


def test_without_speedups_the_page_says_so_and_uses_compression(tmp_path: Path) -> None:
    for num, sparsity in enumerate((0.5, 0.9)):
        make_job(tmp_path, num, sparsity, 8, speedups=False)
    parts = {p.title: p for p in report.write_report(tmp_path)}
    assert parts["Whole-network speedup vs sparsity, per baseline"].png is None
    assert "No job measured speedups" in parts["Whole-network speedup vs sparsity, per baseline"].note
    assert parts["Accuracy-compression Pareto front"].png is not None
    assert parts["Per-layer speedup"].png is None and "speedup_vs_" in parts["Per-layer speedup"].note
    assert "speedup/cudnn_fp32/b1" not in read_summary(tmp_path / "summary.csv")[0]


def test_pareto_front_keeps_only_undominated_points() -> None:
    points = [(1.0, 0.99), (2.0, 0.98), (1.5, 0.97), (4.0, 0.90), (4.0, 0.85), (0.5, 0.99)]
    assert report.pareto_front(points) == [0, 1, 3]


def test_pareto_plot_names_its_front_in_a_key_that_grows_with_it(grid: Path) -> None:
    # The grid's speedups depend on sparsity alone, and 8 bits keep more top-1 than 4: its front is
    # the two 8-bit jobs.
    rows = report.collect(grid)
    labels = report.unique_labels(rows, report.swept_keys(rows))
    heights = []
    for jobs in (rows[:1], rows):
        section = report.plot_pareto(jobs, labels)
        heights.append(Image.open(io.BytesIO(section.png)).height)
    assert heights == [round(100 * (4.2 + 0.15 * n + 0.1)) for n in (1, 2)]
    # The key holds the front's names: other names draw another figure, and one long name widens it.
    renamed = report.plot_pareto(rows, {i: label.upper() for i, label in labels.items()}).png
    assert renamed != report.plot_pareto(rows, labels).png
    long = Image.open(io.BytesIO(report.plot_pareto(rows, {i: "x" * 200 for i in labels}).png))
    assert long.width == round(100 * (0.6 + 0.05 * len("1: " + "x" * 200)))


def test_primary_speedup_prefers_the_most_common_key_then_batch_1() -> None:
    rows = [
        {"status": "ok", "speedup/b/b8": 2.0, "speedup/a/b1": 1.0},
        {"status": "ok", "speedup/b/b8": 3.0, "speedup/a/b1": 1.2, "speedup/c/b1": 4.0},
        {"status": "failed", "speedup/c/b1": 5.0},
    ]
    assert report.primary_speedup(rows) == "speedup/a/b1"


def test_heatmap_reads_only_the_sparse_backend_rows(grid: Path) -> None:
    job = next(grid.glob("2_*"))
    values = report.read_layer_speedups(job, "direct_sparse")
    assert set(values) == {("direct_sparse", "cudnn_fp32", 1), ("direct_sparse", "cudnn_fp16", 1)}
    assert values[("direct_sparse", "cudnn_fp32", 1)] == {"conv1": 0.9, "conv2": 1.8, "fc": 2.7}


def run_report(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "sparsebench.report", *args], cwd=ROOT, capture_output=True, text=True, timeout=120
    )


def test_cli_writes_both_files_and_rejects_a_wrong_dir(
    grid: Path, tmp_path_factory: pytest.TempPathFactory, capsys: pytest.CaptureFixture
) -> None:
    done = run_report(str(grid))  # the installed way: a process of its own
    assert done.returncode == 0, done.stderr
    assert "5 jobs, 1 failed" in done.stdout
    assert (grid / "summary.csv").exists() and (grid / "report.html").exists()
    assert not list(grid.glob(".*.tmp"))  # atomic writes leave no temp files

    for bad, message in [(grid / "nope", "is not a directory"), (tmp_path_factory.mktemp("empty"), "no job folders")]:
        with pytest.raises(SystemExit) as exit_:
            report.main([str(bad)])
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and err.count("\n") == 1 and message in err and err.startswith("error: DIR=")


def test_cli_logs_the_summary_to_wandb_offline(grid: Path, capsys: pytest.CaptureFixture) -> None:
    report.main([str(grid), "--wandb"])
    assert "wandb:" in capsys.readouterr().out
    runs = list((grid / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))
    tables = list(runs[0].glob("files/media/table/summary_*.table.json"))
    assert len(tables) == 1
    table = json.loads(tables[0].read_text())
    assert len(table["data"]) == 5 and "acc_final" in table["columns"]
    assert len(list(runs[0].glob("files/media/images/plots/*.png"))) == 6


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt-get install -y chromium)")
def test_report_renders_in_headless_chromium(grid: Path) -> None:
    report.write_report(grid)
    shot = grid / "shot.png"
    done = subprocess.run(
        ["bash", str(ROOT / "scripts" / "screenshot_report.sh"), str(grid), str(shot), "1280x1600"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    image = Image.open(shot).convert("RGB")
    assert image.size == (1280, 1600)
    # The plots' coloured lines and markers show only if the inline PNGs decoded: a page of text and
    # table alone has a few hundred saturated pixels (red error text), a blank page none.
    pixels = image.get_flattened_data() if hasattr(image, "get_flattened_data") else image.getdata()
    saturated = sum(1 for r, g, b in pixels if max(r, g, b) - min(r, g, b) > 60)
    assert saturated > 3000


def test_an_unpruned_job_has_target_sparsity_zero(tmp_path: Path) -> None:
    # An experiment file may set prune.final_sparsity; with prune=none the job's target is 0.
    job = make_job(tmp_path / "sweep", 0, 0.9, 8)
    (job / ".hydra" / "config.yaml").write_text(
        yaml.safe_dump({"prune": {"method": "none", "final_sparsity": 0.9}, "quant": {"method": "linear", "bits": 8}})
    )
    report.write_summary(tmp_path / "sweep" / "summary.csv", report.collect(tmp_path / "sweep"))
    (row,) = read_summary(tmp_path / "sweep" / "summary.csv")
    assert (row["prune_method"], float(row["target_sparsity"]), row["method"]) == ("none", 0.0, "linear")


def test_jobs_in_renamed_folders_keep_their_numbers_and_labels(grid: Path) -> None:
    # hydra.sweep.subdir=job${hydra.job.num} (for file systems that refuse `=` and `,`): the number
    # comes from each job's .hydra/hydra.yaml.
    for job in list(grid.glob("*_*")):
        num = int(job.name.split("_", 1)[0])
        (job / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump({"hydra": {"mode": "MULTIRUN", "job": {"num": num}}}))
        job.rename(grid / f"job{num}")
    rows = report.collect(grid)
    assert [r["num"] for r in rows] == [0, 1, 2, 3, 4]
    assert report.job_label(rows[3], report.swept_keys(rows)) == "final_sparsity=0.9 bits=8"


def test_a_swept_key_one_job_left_at_its_config_value_shows_that_value(grid: Path) -> None:
    # Two sweeps in one folder, one of them with trainer.finetune_epochs=100 prune.end=50 quant=kmeans
    # quant.kmeans_per_channel=true: the other jobs ran the experiment's 60 and 30.0 (a float in the
    # schema), False, and its quant group's choice, which their overrides do not name.
    for job in grid.glob("*_*"):
        config = yaml.safe_load((job / ".hydra" / "config.yaml").read_text())
        config = {
            **config,
            "trainer": {"finetune_epochs": 60},
            "prune": {**config["prune"], "end": 30.0},
            "quant": {**config["quant"], "kmeans_per_channel": False},
        }
        (job / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
        (job / ".hydra" / "hydra.yaml").write_text(
            yaml.safe_dump({"hydra": {"runtime": {"choices": {"quant": "linear"}}}})
        )
    other_sweep = next(grid.glob("3_*")) / ".hydra" / "overrides.yaml"
    other_sweep.write_text(
        yaml.safe_dump(
            yaml.safe_load(other_sweep.read_text())
            + ["trainer.finetune_epochs=100", "prune.end=50", "quant=kmeans", "quant.kmeans_per_channel=true"]
        )
    )
    rows = report.collect(grid)
    assert [r["trainer.finetune_epochs"] for r in rows] == [60, 60, 60, 100, 60]
    assert [r["prune.end"] for r in rows] == [30, 30, 30, 50, 30]  # one spelling per column
    assert [r["prune.final_sparsity"] for r in rows] == [0.5, 0.5, 0.9, 0.9, 0.95]
    assert [r["quant.kmeans_per_channel"] for r in rows] == [False, False, False, True, False]
    assert [r["quant"] for r in rows] == [
        "linear",
        "linear",
        "linear",
        "kmeans",
        "linear",
    ]  # the choice, not the subtree


def read_summary_of(path: Path) -> list:
    report.write_summary(path / "summary.csv", report.collect(path))
    return read_summary(path / "summary.csv")


def markdown_lines(path: Path) -> list:
    return report.markdown_table(report.collect(path)).splitlines()


def test_layer_wins_and_markdown_table(grid: Path) -> None:
    report.write_report(grid)
    rows = read_summary(grid / "summary.csv")
    # Job 3 (0.9 sparsity): its layers run at 0.9, 1.8, 2.7x cuDNN fp32 and a quarter of that vs fp16.
    assert (rows[3]["faster/cudnn_fp32/b1"], rows[3]["faster/cudnn_fp16/b1"]) == ("2 of 3", "0 of 3")
    assert rows[0]["faster/cudnn_fp32/b1"] == "1 of 3"  # 0.5, 1.0 (a tie is no win), 1.5
    lines = (grid / "table.md").read_text().splitlines()
    assert lines[0].startswith("| final_sparsity | bits | top-1 | Δ vs dense | footprint | compression | MACs kept |")
    assert "layers faster than cudnn_fp32 b1" in lines[0]
    assert len(lines) == 2 + 4 + 2  # header, rule, the four finished jobs, then the one that died, named
    assert lines[-1] == f"Not in the table (1 of 5 jobs): `{next(grid.glob('4_*')).name}` (`{report.DIED}`)."
    metrics = json.loads(next(grid.glob("3_*/metrics.json")).read_text())
    cells = [c.strip() for c in lines[5].strip("|").split("|")]
    assert cells[:4] == [
        "0.9",
        "8",
        f"{100 * metrics['acc_final']:.2f}%",
        f"{100 * (metrics['acc_final'] - 0.98):+.2f}",
    ]
    assert cells[6] == "15.0%" and rows[3]["macs_kept"] == "0.15"  # the multiply-adds kept, also in summary.csv
    assert cells[-2:] == ["0 of 3", "2 of 3"]  # fp16, fp32: columns by baseline name
    # A run directory on its own (no job number) is a job too, not the dense reference.
    single = grid / "3_prune.final_sparsity=0.9,quant.bits=8"
    alone = [c.strip() for c in markdown_lines(single)[2].strip("|").split("|")]
    assert alone[0] == single.name and alone[1:3] == cells[2:4]  # its own top-1 and Δ vs dense


def test_a_key_only_left_out_jobs_set_gets_no_column_null_reads_null_and_a_missing_key_blank(grid: Path) -> None:
    def add_overrides(job: Path, *extra: str) -> None:
        file = job / ".hydra" / "overrides.yaml"
        file.write_text(yaml.safe_dump(yaml.safe_load(file.read_text()) + list(extra)))

    failed = make_job(grid, 5, 0.9, 4, status="failed")  # e.g. its teacher file was missing
    add_overrides(failed, "trainer.teacher=/runs/r18/dense.pt")
    lines = markdown_lines(grid)
    assert "teacher" not in lines[0]
    assert lines[-1].startswith(
        f"Not in the table (2 of 6 jobs): `{failed.name}` (`RuntimeError: CUDA out of memory`); "
    )
    add_overrides(next(grid.glob("1_*")), "trainer.teacher=/runs/r18/dense.pt")  # now a finished job differs
    for job in grid.glob("[23]_*"):  # their configs hold the key, at null; job 0's has none (an older job)
        config = yaml.safe_load((job / ".hydra" / "config.yaml").read_text())
        (job / ".hydra" / "config.yaml").write_text(yaml.safe_dump({**config, "trainer": {"teacher": None}}))
    lines = markdown_lines(grid)
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    column = [[c.strip() for c in line.strip("|").split("|")][head.index("teacher")] for line in lines[2:6]]
    assert column == ["", "/runs/r18/dense.pt", "null", "null"]
    rows = report.collect(grid)
    assert report.job_label(rows[0], report.swept_keys(rows)) == "final_sparsity=0.5 bits=4"  # no "teacher="
    teachers = {r["num"]: r["trainer.teacher"] for r in read_summary_of(grid)}  # csv: null and missing both empty
    assert teachers == {"0": "", "1": "/runs/r18/dense.pt", "2": "", "3": "", "4": "", "5": "/runs/r18/dense.pt"}


def test_a_swept_key_a_job_does_not_read_is_blank_in_its_row_and_label(grid: Path) -> None:
    # Sweeps that set quant.kmeans_per_channel and prune.scope for every format: a linear job ignores
    # the first, and the sparsity-0 point (no pruning) the second.
    for job in grid.glob("[0-3]_*"):
        file = job / ".hydra" / "overrides.yaml"
        per_channel, scope = ("false", "global") if job.name.startswith("2_") else ("true", "layer")
        file.write_text(
            yaml.safe_dump(
                yaml.safe_load(file.read_text()) + [f"quant.kmeans_per_channel={per_channel}", f"prune.scope={scope}"]
            )
        )
    kmeans, unpruned = next(grid.glob("3_*")), next(grid.glob("0_*"))
    for job, group, method in ((kmeans, "quant", "kmeans"), (unpruned, "prune", "none")):
        config = yaml.safe_load((job / ".hydra" / "config.yaml").read_text())
        config[group]["method"] = method
        (job / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    lines = markdown_lines(grid)
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:6]]
    assert [(r[head.index("kmeans_per_channel")], r[head.index("scope")]) for r in rows] == [
        ("", ""),
        ("", "layer"),
        ("", "global"),
        ("True", "layer"),
    ]
    collected = report.collect(grid)
    swept = report.swept_keys(collected)
    assert report.job_label(collected[3], swept) == "final_sparsity=0.9 bits=8 kmeans_per_channel=True scope=layer"
    assert report.job_label(collected[1], swept) == "final_sparsity=0.5 bits=8 scope=layer"
    report.write_report(grid)
    summary = read_summary(grid / "summary.csv")  # keeps what each job's config held
    assert [(r["quant.kmeans_per_channel"], r["prune.scope"]) for r in summary[:4]] == [
        ("True", "layer"),
        ("True", "layer"),
        ("False", "global"),
        ("True", "layer"),
    ]
    # Two jobs that differ only in a key neither reads share a label: plots keyed by it keep both.
    twin = grid / "5_twin"
    shutil.copytree(next(grid.glob("1_*")), twin)
    file = twin / ".hydra" / "overrides.yaml"
    file.write_text(
        yaml.safe_dump(
            [o.replace("kmeans_per_channel=true", "kmeans_per_channel=false") for o in yaml.safe_load(file.read_text())]
        )
    )
    collected = report.collect(grid)
    labels = report.unique_labels(collected, report.swept_keys(collected))
    twins = [labels[id(r)] for r in collected if r["job"] in (twin.name, next(grid.glob("1_*")).name)]
    assert twins == ["final_sparsity=0.5 bits=8 scope=layer (job 1)", "final_sparsity=0.5 bits=8 scope=layer (job 5)"]
    # ... and so do the table's rows, in their last label cell.
    cells = [[c.strip() for c in line.strip("|").split("|")][:4] for line in markdown_lines(grid)[2:7]]
    assert [c for c in cells if "job" in c[3]] == [["0.5", "8", "", "layer (job 1)"], ["0.5", "8", "", "layer (job 5)"]]


def test_a_swept_method_shows_none_where_a_job_has_none(grid: Path) -> None:
    # prune.method=none,agp: the unpruned job's cell reads none, not blank (method is always read).
    job = next(grid.glob("0_*"))
    for path, edit in (
        (job / ".hydra" / "overrides.yaml", lambda o: o + ["prune.method=none"]),
        *((j / ".hydra" / "overrides.yaml", lambda o: o + ["prune.method=agp"]) for j in grid.glob("[1-3]_*")),
    ):
        path.write_text(yaml.safe_dump(edit(yaml.safe_load(path.read_text()))))
    config = yaml.safe_load((job / ".hydra" / "config.yaml").read_text())
    config["prune"]["method"] = "none"
    (job / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    lines = markdown_lines(grid)
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    assert [[c.strip() for c in line.strip("|").split("|")][head.index("method")] for line in lines[2:6]] == [
        "none",
        "agp",
        "agp",
        "agp",
    ]


def test_speedups_timed_beside_other_gpu_work_are_marked_noisy(grid: Path) -> None:
    job = next(grid.glob("3_*"))
    metrics = json.loads((job / "metrics.json").read_text())
    metrics["bench/noisy"] = "cudnn_fp32/b1"  # the baseline's timing spread widely; fp16's did not
    (job / "metrics.json").write_text(json.dumps(metrics))
    lines = markdown_lines(grid)
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    cells = [c.strip() for c in lines[5].strip("|").split("|")]
    assert cells[head.index("vs cudnn_fp32 b1")] == f"{metrics['speedup/cudnn_fp32/b1']:.2f}x (noisy)"
    assert cells[head.index("vs cudnn_fp16 b1")] == f"{metrics['speedup/cudnn_fp16/b1']:.2f}x"
    assert not any("(noisy)" in line for line in lines[2:5])  # the other jobs' speedups stand
    assert lines[-1].startswith("(noisy): one of the two timings spread")
    metrics["bench/noisy"] = "direct_sparse/b1"  # our side noisy: every speedup at that batch is suspect
    (job / "metrics.json").write_text(json.dumps(metrics))
    assert markdown_lines(grid)[5].count("(noisy)") == 2
    report.write_report(grid)
    assert [r["noisy_timings"] for r in read_summary(grid / "summary.csv")][3] == "direct_sparse/b1"


def test_learning_curves_from_each_jobs_history(grid: Path) -> None:
    job = next(grid.glob("1_*"))
    lines = [
        {"step": 10, "finetune/loss": 1.0},
        {"step": 20, "finetune/epoch": 1, "finetune/acc": 0.5},
        {"step": 40, "finetune/epoch": 2, "finetune/acc": 0.7},
        {"step": 40, "finetune/epoch": 2, "finetune/acc": 0.8},
    ]  # epoch 2 again after a resume
    (job / "history.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + '\n{"step": 4')  # cut short
    assert report.read_curves(job) == {"finetune": [(1, 0.5), (2, 0.8)]}
    parts = report.write_report(grid)
    curves = next(p for p in parts if p.title.startswith("Test accuracy per epoch"))
    assert curves.png and not curves.note
    assert (grid / "plots" / report.plot_filename(len(parts), curves.title)).exists()
    assert report.read_curves(next(grid.glob("0_*"))) == {}  # no history: no curve


def test_a_moving_average_gives_its_own_curve(grid: Path) -> None:
    job = next(grid.glob("1_*"))
    lines = [
        {"step": 20, "dense/epoch": 1, "dense/acc": 0.5, "dense/acc_ema": 0.4},
        {"step": 40, "dense/epoch": 2, "dense/acc": 0.6, "dense/acc_ema": 0.7},
        {"step": 60, "finetune/epoch": 1, "finetune/acc": 0.65},
    ]
    (job / "history.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
    assert report.read_curves(job) == {
        "dense": [(1, 0.5), (2, 0.6)],
        "dense ema": [(1, 0.4), (2, 0.7)],
        "finetune": [(1, 0.65)],
    }
    parts = report.write_report(grid)
    assert next(p for p in parts if p.title.startswith("Test accuracy per epoch")).png


def test_macs_kept_column_only_where_jobs_measured_it(grid: Path) -> None:
    files = sorted(grid.glob("[0-3]_*/metrics.json"))
    for i, file in enumerate(files):  # jobs from before macs_kept: job 0 alone, then all of them
        metrics = json.loads(file.read_text())
        del metrics["macs_kept"]
        file.write_text(json.dumps(metrics))
        lines = markdown_lines(grid)
        if i == 0:
            assert "| MACs kept |" in lines[0] and [c.strip() for c in lines[2].strip("|").split("|")][6] == "—"
    assert "MACs kept" not in lines[0]


def test_keys_of_one_threshold_are_blank_where_each_layer_is_pruned_alone(grid: Path) -> None:
    # macs_exponent=0,0.5 and max_layer_sparsity=1,0.98: only job 2 prunes with one threshold and reads them.
    for job in grid.glob("[0-3]_*"):
        scope, exponent, ceiling = ("global", 0.5, 0.98) if job.name.startswith("2_") else ("layer", 0, 1)
        config = yaml.safe_load((job / ".hydra" / "config.yaml").read_text())
        config["prune"].update(scope=scope, macs_exponent=exponent, max_layer_sparsity=ceiling)
        (job / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
        file = job / ".hydra" / "overrides.yaml"
        file.write_text(
            yaml.safe_dump(
                yaml.safe_load(file.read_text())
                + [f"prune.macs_exponent={exponent}", f"prune.max_layer_sparsity={ceiling}"]
            )
        )
    lines = markdown_lines(grid)
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:6]]
    assert [(r[head.index("macs_exponent")], r[head.index("max_layer_sparsity")]) for r in rows] == [
        ("", ""),
        ("", ""),
        ("0.5", "0.98"),
        ("", ""),
    ]


def test_jobs_are_ordered_by_their_swept_values_across_sweeps_sharing_a_folder(grid: Path) -> None:
    # A second sweep in the same folder numbers its jobs from 0 again: job order would interleave them.
    # Its 16 bits sort after 8 as a number (not as text), its repeat of 0.5/4 after job 0 (ties keep job
    # order), and the folder's shared dense model comes first whatever its values.
    make_job(grid, 0, 0.7, 16)
    make_job(grid, 1, 0.95, 4)
    make_job(grid, 2, 0.7, 4)
    (make_job(grid, 3, 0.5, 4) / "metrics.json").unlink()  # died before metrics.json
    dense = make_job(grid, 9, 0.99, 32).rename(grid / "dense-0123abcd")
    config = yaml.safe_load((dense / ".hydra" / "config.yaml").read_text())  # values that would sort it last
    shutil.rmtree(dense / ".hydra")  # a shared dense run: metrics.json and manifest.json, no job number
    (dense / "manifest.json").write_text(json.dumps({"config": config}))
    report.write_report(grid)
    rows = read_summary(grid / "summary.csv")
    assert [(r["prune.final_sparsity"], r["quant.bits"], r["num"]) for r in rows] == [
        ("0.99", "32", ""),
        ("0.5", "4", "0"),
        ("0.5", "4", "3"),
        ("0.5", "8", "1"),
        ("0.7", "4", "2"),
        ("0.7", "16", "0"),
        ("0.9", "4", "2"),
        ("0.9", "8", "3"),
        ("0.95", "2", "4"),
        ("0.95", "4", "1"),
    ]
    cells = [[c.strip() for c in line.strip("|").split("|")][:2] for line in markdown_lines(grid)[2:10]]
    assert cells == [
        ["dense", ""],
        ["0.5", "4"],
        ["0.5", "8"],
        ["0.7", "4"],
        ["0.7", "16"],
        ["0.9", "4"],
        ["0.9", "8"],
        ["0.95", "4"],
    ]
