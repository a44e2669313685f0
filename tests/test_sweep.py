"""Multirun sweeps end to end on digits (tiny settings): job folders, the report, failure isolation,
the shared dense pre-training, W&B grouping, the launchers' configs and the GPU choice."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from sparsebench.__main__ import CONF_DIR  # importing the app registers its schema and resolvers
from sparsebench.config import validate
from sparsebench.multirun import callback, dense, gpus, naming, relaunch
from tests.conftest import DENSE, TINY, run_cli
from tests.conftest import compose as compose_job

# Seconds per job on a CPU: no benchmark, one short retraining epoch with pruning and QAT.
COMPRESS = [*TINY, "bench=none", "trainer.finetune_epochs=1", "prune.unit=epoch", "prune.end=1"]


def jobs_of(sweep_dir: Path) -> list:
    return sorted((p for p in sweep_dir.iterdir() if (p / ".hydra").is_dir()), key=lambda p: int(p.name.split("_")[0]))


def summary(sweep_dir: Path) -> list:
    with open(sweep_dir / "summary.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_four_job_sweep_gets_four_runs_and_a_report(tmp_path: Path) -> None:
    done = run_cli("-m", *COMPRESS, "prune.final_sparsity=0.5,0.9", "quant.bits=4,8", f"hydra.sweep.dir={tmp_path}")
    assert done.returncode == 0, done.stderr[-2000:]
    jobs = jobs_of(tmp_path)
    assert len(jobs) == 4
    metrics = [json.loads((j / "metrics.json").read_text()) for j in jobs]
    assert all(m["status"] == "ok" and 0.1 < m["acc_final"] <= 1 for m in metrics)
    assert [yaml.safe_load((j / ".hydra" / "overrides.yaml").read_text())[-2:] for j in jobs] == [
        ["prune.final_sparsity=0.5", "quant.bits=4"],
        ["prune.final_sparsity=0.5", "quant.bits=8"],
        ["prune.final_sparsity=0.9", "quant.bits=4"],
        ["prune.final_sparsity=0.9", "quant.bits=8"],
    ]
    # Each job's own numbers: sparser and fewer bits -> smaller footprint.
    assert [m["weight_bits"] for m in metrics] == [4, 8, 4, 8]
    assert metrics[2]["sparsity"] > metrics[0]["sparsity"] > 0.3
    assert metrics[2]["footprint_bytes"] < metrics[0]["footprint_bytes"] < metrics[1]["footprint_bytes"]

    rows = summary(tmp_path)
    assert [r["num"] for r in rows] == ["0", "1", "2", "3"]
    assert [r["prune.final_sparsity"] for r in rows] == ["0.5", "0.5", "0.9", "0.9"]
    assert [r["quant.bits"] for r in rows] == [r["bits"] for r in rows] == ["4", "8", "4", "8"]
    assert [float(r["acc_final"]) for r in rows] == pytest.approx([m["acc_final"] for m in metrics])
    assert [float(r["compression"]) for r in rows] == pytest.approx([m["compression"] for m in metrics])
    assert {r["method"] for r in rows} == {"agp+linear"} and {r["status"] for r in rows} == {"ok"}
    assert {"overrides", "acc_dense", "sparsity", "footprint_bytes", "error"} <= set(rows[0])
    page = (tmp_path / "report.html").read_text()
    assert page.count("src='data:image/png;base64,") == 4  # accuracy, Pareto (compression), footprint, curves
    assert "No job measured speedups" in page


def test_a_failing_job_is_recorded_and_the_others_finish(tmp_path: Path) -> None:
    garbage = tmp_path / "not_a_checkpoint.pt"
    garbage.write_text("this is not a torch file")
    sweep_dir = tmp_path / "sweep"
    # Job 0 is an impossible value, job 1 is fine (it runs after a failure), job 2 is impossible too,
    # job 3 crashes while loading its weights.
    done = run_cli(
        "-m", *DENSE, f"trainer.init_from=null,{garbage}", "trainer.lr=-1,0.1", f"hydra.sweep.dir={sweep_dir}"
    )
    assert done.returncode == 1  # every job ran; the exit code says that some failed
    assert "sweep: 3 of 4 jobs failed (job 0, 2, 3)" in done.stderr
    metrics = [json.loads((j / "metrics.json").read_text()) for j in jobs_of(sweep_dir)]
    assert [m["status"] for m in metrics] == ["failed", "ok", "failed", "failed"]
    assert metrics[1]["acc_final"] > 0.1 and (jobs_of(sweep_dir)[1] / "dense.pt").exists()
    assert metrics[0]["error"] == metrics[2]["error"] == "ConfigError: trainer.lr=-1.0 is not allowed: a number > 0"
    assert not metrics[3]["error"].startswith("ConfigError") and "acc_final" not in metrics[3]
    rows = summary(sweep_dir)
    assert [r["status"] for r in rows] == ["failed", "ok", "failed", "failed"]
    assert rows[0]["error"] == metrics[0]["error"] and rows[3]["error"] == metrics[3]["error"]


def test_jobs_share_one_dense_pretraining(tmp_path: Path) -> None:
    done = run_cli(
        "-m",
        *DENSE,
        "trainer.init_from=shared",
        "trainer.finetune_lr=0.01,0.02",
        "logger=wandb",
        "logger.mode=offline",
        f"hydra.sweep.dir={tmp_path}",
    )
    assert done.returncode == 0, done.stderr[-2000:]
    dense_runs = list(tmp_path.glob("dense-*"))
    assert len(dense_runs) == 1  # one dense model for both jobs (they differ only after dense training)
    dense = json.loads((dense_runs[0] / "metrics.json").read_text())
    jobs = jobs_of(tmp_path)
    for job in jobs:
        manifest = json.loads((job / "manifest.json").read_text())
        assert manifest["config"]["trainer"]["init_from"] == str(dense_runs[0] / "dense.pt")
        assert json.loads((job / "metrics.json").read_text())["acc_dense"] == dense["acc_dense"]
        # W&B: grouped by the sweep, typed, tagged with the job's overrides; one offline run a job.
        logger = manifest["config"]["logger"]
        assert logger["group"] == f"default/{tmp_path.name}" and logger["job_type"] == "dense"
        assert "trainer.finetune_lr=" + job.name.split("finetune_lr=")[1].split(",")[0] in logger["tags"]
        assert not any(t.startswith(("logger.", "hydra.", "trainer.init_from")) for t in logger["tags"])
        assert len(list((job / "wandb").glob("offline-run-*"))) == 1
    assert summary(tmp_path)[0]["job"] == dense_runs[0].name  # the dense reference leads the report


def test_a_stopped_sweep_continues_where_it_stopped_with_resume(tmp_path: Path) -> None:
    args = [
        "-m",
        *COMPRESS,
        "trainer.init_from=shared",
        "prune.final_sparsity=0.5,0.7,0.9",
        f"hydra.sweep.dir={tmp_path}",
    ]
    assert run_cli(*args).returncode == 0
    done, stopped, unstarted = jobs_of(tmp_path)
    # As a time limit leaves a sweep: one job finished, one killed after its last checkpoint (before
    # export), one never started; the dense model is done.
    (stopped / "metrics.json").unlink()
    (stopped / "packed.safetensors").unlink()
    shutil.rmtree(unstarted)
    kept = {
        p: p.stat().st_mtime_ns
        for p in (done / "metrics.json", stopped / "checkpoints" / "last.pt", next(tmp_path.glob("dense-*/dense.pt")))
    }

    again = run_cli(*args, "trainer.resume=true")
    assert again.returncode == 0, again.stderr[-2000:]
    assert {p: p.stat().st_mtime_ns for p in kept} == kept  # not rerun, not retrained, not re-saved
    assert [r["status"] for r in summary(tmp_path) if r["num"]] == ["ok", "ok", "ok"]
    assert (stopped / "packed.safetensors").exists() and (unstarted / "packed.safetensors").exists()
    metrics = json.loads((unstarted / "metrics.json").read_text())
    assert metrics["sparsity"] == pytest.approx(0.9, abs=0.01)


def test_a_sweep_distils_another_networks_dense_model(tmp_path: Path) -> None:
    # trainer.teacher is for retraining: the sweep's shared dense model trains without it.
    teacher = tmp_path / "teacher"
    assert run_cli(*DENSE, "model.width=0.5", f"hydra.run.dir={teacher}").returncode == 0
    done = run_cli(
        "-m",
        *COMPRESS,
        "trainer.init_from=shared",
        "trainer.distill=0.5",
        "prune.final_sparsity=0.5,0.9",
        f"trainer.teacher={teacher / 'dense.pt'}",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert [r["status"] for r in summary(tmp_path / "sweep")] == ["ok", "ok", "ok"]
    acc_teacher = json.loads((teacher / "metrics.json").read_text())["acc_dense"]
    assert [json.loads((job / "metrics.json").read_text())["acc_teacher"] for job in jobs_of(tmp_path / "sweep")] == [
        acc_teacher,
        acc_teacher,
    ]


def test_a_resumed_sweep_resumes_its_shared_dense_model(tmp_path: Path) -> None:
    args = ["-m", *COMPRESS, "trainer.init_from=shared", "prune.final_sparsity=0.5", f"hydra.sweep.dir={tmp_path}"]
    assert run_cli(*args).returncode == 0
    # As if the time limit came during the dense training, after its last checkpoint.
    dense_dir = next(tmp_path.glob("dense-*"))
    for stale in [dense_dir / "dense.pt", dense_dir / "metrics.json", *jobs_of(tmp_path)]:
        shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
    checkpoint = dense_dir / "checkpoints" / "last.pt"
    written = checkpoint.stat().st_mtime_ns

    again = run_cli(*args, "trainer.resume=true")
    assert again.returncode == 0, again.stderr[-2000:]
    assert "resuming the shared dense model" in again.stdout + again.stderr
    assert checkpoint.stat().st_mtime_ns == written  # resumed at its last step: not trained again
    assert (dense_dir / "dense.pt").exists() and [r["status"] for r in summary(tmp_path)] == ["ok", "ok"]


def test_a_sweep_resumed_with_another_config_refuses_the_changed_jobs(tmp_path: Path) -> None:
    args = ["-m", *COMPRESS, "prune.final_sparsity=0.5,0.9", f"hydra.sweep.dir={tmp_path}"]
    assert run_cli(*args).returncode == 0
    changed, same = jobs_of(tmp_path)
    # As if the experiment's YAML had changed since: job 0's earlier launch ran another prune.end.
    manifest = json.loads((changed / "manifest.json").read_text())
    manifest["config"]["prune"]["end"] = 0.5
    (changed / "manifest.json").write_text(json.dumps(manifest))
    kept = (changed / "metrics.json").read_text()

    again = run_cli(*args, "trainer.resume=true")
    # Job 0 is refused in one line and keeps its earlier files (so the report still counts it ok).
    assert again.returncode == 0
    assert (
        f"error: trainer.resume=true: {changed} ran with prune.end=0.5, this launch has prune.end=1.0; "
        "give a new hydra.sweep.dir"
    ) in again.stderr
    assert (changed / "metrics.json").read_text() == kept
    assert "job 1 finished in an earlier launch" in again.stdout + again.stderr


def test_a_sweep_counts_only_its_own_jobs_in_a_shared_folder(tmp_path: Path) -> None:
    # Another sweep writing into the same folder, its job still running: folder made, no metrics.json.
    other = tmp_path / "s0.9_other"
    (other / ".hydra").mkdir(parents=True)
    (other / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(["prune.final_sparsity=0.9", "quant.bits=8"]))
    done = run_cli(
        "-m",
        *COMPRESS,
        "prune.final_sparsity=0.5",
        "quant.bits=4,8",
        f"hydra.sweep.dir={tmp_path}",
        "hydra.sweep.subdir=s${prune.final_sparsity}_${quant.bits}",
    )
    assert done.returncode == 0, done.stderr[-2000:]  # the other sweep's unfinished job is not a failure here
    assert "1 of the 3 jobs" in done.stdout + done.stderr
    assert sorted(r["status"] for r in summary(tmp_path)) == ["failed", "ok", "ok"]  # the report covers the folder


def test_own_jobs_match_values_and_keys_as_jobs_record_them() -> None:
    def row(job: str, *overrides: str) -> dict:
        return {"job": job, "_overrides": list(overrides)}

    common = ["experiment=paper_vgg16_cifar10", "trainer.resume=True", "bench.baselines=[cudnn_fp32,cudnn_fp16]"]
    rows = [
        row("dense-ab12"),
        *(
            row(f"s{s}_{w}", f"prune.final_sparsity={s}", f"weights={w}", "trainer.init_from=shared", *common)
            for s, w in [("0", "kmeans4"), ("0.9", "kmeans4"), ("0.9", "fp32"), ("0.95", "kmeans4")]
        ),
        row(
            "s0.95_kmeans4_ft100",
            "prune.final_sparsity=0.95",
            "weights=kmeans4",
            "trainer.init_from=shared",
            "trainer.finetune_epochs=100",
            *common,
        ),
    ]
    params = {
        "prune.final_sparsity": "0,0.8,0.9,0.95",
        "weights": "fp32,linear8,linear4,kmeans4",
        "trainer.init_from": "shared",
    }
    task = ["experiment=paper_vgg16_cifar10", "trainer.resume=true", "bench.baselines=[cudnn_fp32,cudnn_fp16]"]
    jobs = lambda *line: [r["job"] for r in callback.own_jobs(rows, task + list(line), params)]  # noqa: E731
    assert jobs("prune.final_sparsity=0,0.9,0.95", "weights=kmeans4") == [
        "dense-ab12",
        "s0_kmeans4",
        "s0.9_kmeans4",
        "s0.95_kmeans4",
    ]  # not fp32, not the 100-epoch one
    assert jobs("prune.final_sparsity=0.9", "weights=fp32") == ["dense-ab12", "s0.9_fp32"]
    assert jobs("prune.final_sparsity=0.95", "weights=kmeans4", "trainer.finetune_epochs=100") == [
        "dense-ab12",
        "s0.95_kmeans4_ft100",
    ]
    assert "s0.95_kmeans4_ft100" not in jobs() and len(jobs()) == 5  # the experiment's own grid: all the others
    # Quoted sweep values, as Hydra records them; a job with no recorded overrides counts as this sweep's.
    quoted = [row("0_a", 'trainer.init_from="/tmp/a b.pt"'), row("1_a", "trainer.init_from=null"), row("2_a")]
    assert [r["job"] for r in callback.own_jobs(quoted, ['trainer.init_from="/tmp/a b.pt",null'])] == [
        "0_a",
        "1_a",
        "2_a",
    ]
    assert [r["job"] for r in callback.own_jobs(quoted, ["trainer.init_from=null"])] == ["1_a", "2_a"]


def test_shared_dense_needs_a_multirun() -> None:
    done = run_cli(*DENSE, "trainer.init_from=shared", "hydra.run.dir=/tmp/never-made")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "error: trainer.init_from=shared needs a multirun (-m): it shares one dense model between the jobs of a "
        "sweep; give a dense.pt path for a single run"
    ]


def test_dense_key_ignores_what_happens_after_dense_training() -> None:
    base = compose_job("prune=agp", "quant=linear", "trainer.finetune_epochs=4")
    assert dense.dense_key(base) == dense.dense_key(
        compose_job(
            "prune=agp",
            "quant=linear",
            "quant.bits=4",
            "trainer.finetune_epochs=8",
            "trainer.finetune_lr=0.01",
            "trainer.distill=0.5",
            "trainer.teacher=other/dense.pt",
            "prune.regrow_until=3",
        )
    )
    # How fast the dense model trains is not what it is: eager and CUDA-graph retraining compare from one model.
    assert dense.dense_key(base) == dense.dense_key(
        compose_job("prune=agp", "quant=linear", "trainer.compile=true", "trainer.compile_mode=reduce-overhead")
    )
    assert dense.dense_key(base) == dense.dense_key(compose_job("prune=agp", "quant=linear", "trainer.eval_every=5"))
    assert dense.dense_key(base) != dense.dense_key(compose_job("prune=agp", "quant=linear", "data.drop_last=true"))
    assert dense.dense_key(base) != dense.dense_key(compose_job("prune=agp", "quant=linear", "seed=1"))
    assert dense.dense_key(base) != dense.dense_key(compose_job("prune=agp", "quant=linear", "model.width=0.5"))
    pretrain = dense.dense_config(base)
    assert (pretrain.prune.method, pretrain.quant.method, pretrain.quant.bits, pretrain.trainer.finetune_epochs) == (
        "none",
        "none",
        32,
        0,
    )
    assert dense.dense_config(compose_job("prune=agp", "trainer.distill=0.5")).trainer.distill == 0
    taught = dense.dense_config(compose_job("prune=agp", "trainer.distill=0.5", "trainer.teacher=other/dense.pt"))
    assert taught.trainer.teacher is None
    validate(taught)  # the shared dense model of a sweep distilling another network's trains as any other


def test_keys_added_since_leave_an_older_sweep_folder_resumable(tmp_path: Path) -> None:
    # The dense keys of these configs before data.trivialaugment and trainer.ema_decay existed (4b42876):
    # a folder from then finds its dense model. (Changing a default changes them on purpose: data.val_fraction's
    # 0.1 holds out images the dense model of then trained on.)
    assert dense.dense_key(compose_job("data.val_fraction=0")) == "72707400"
    old_vgg = (
        "trainer.epochs=200",
        "data.trivialaugment=false",
        "trainer.ema_decay=null",  # the paper recipe of then
        "data.drop_last=false",
    )
    assert dense.dense_key(compose_job("experiment=paper_vgg16_cifar10", *old_vgg)) == "9b6ecae9"
    assert dense.dense_key(compose_job("trainer.ema_decay=0.999")) != "72707400"
    # A job finished then, its manifest without the new keys, is kept as finished.
    cfg = compose_job()
    earlier = OmegaConf.to_container(cfg, resolve=True)
    del earlier["data"]["trivialaugment"], earlier["trainer"]["ema_decay"]
    del earlier["trainer"]["distill"], earlier["trainer"]["distill_temperature"]
    del earlier["prune"]["regrow_until"], earlier["prune"]["regrow_fraction"]
    del earlier["quant"]["kmeans_per_channel"], earlier["trainer"]["teacher"]
    del earlier["data"]["drop_last"], earlier["trainer"]["eval_every"]
    del earlier["prune"]["types"], earlier["data"]["val"]
    (tmp_path / "manifest.json").write_text(json.dumps({"config": earlier}))
    (tmp_path / "metrics.json").write_text(json.dumps({"status": "ok", "acc_final": 0.9}))
    assert relaunch.finished_job(cfg, tmp_path) == {"status": "ok", "acc_final": 0.9}
    # Scoring the test set more or less often computes the same job; dropping the short batch does not.
    assert relaunch.finished_job(compose_job("trainer.eval_every=5"), tmp_path) == {"status": "ok", "acc_final": 0.9}
    with pytest.raises(ValueError, match="ran with data.drop_last=None, this launch has data.drop_last=True"):
        relaunch.finished_job(compose_job("data.drop_last=true"), tmp_path)
    with pytest.raises(ValueError, match="ran with trainer.ema_decay=None, this launch has trainer.ema_decay=0.99"):
        relaunch.finished_job(compose_job("trainer.ema_decay=0.99"), tmp_path)
    # A k-means job of then (one codebook per layer; quant.per_channel=true recorded but unused) is kept,
    # and a relaunch asking for per-channel codebooks is told it differs.
    kmeans = compose_job("quant=kmeans")
    earlier = OmegaConf.to_container(kmeans, resolve=True)
    del earlier["quant"]["kmeans_per_channel"], earlier["trainer"]["teacher"]
    assert earlier["quant"]["per_channel"] is True
    (tmp_path / "manifest.json").write_text(json.dumps({"config": earlier}))
    assert relaunch.finished_job(kmeans, tmp_path) == {"status": "ok", "acc_final": 0.9}
    with pytest.raises(
        ValueError, match="ran with quant.kmeans_per_channel=None, this launch has quant.kmeans_per_channel=True"
    ):
        relaunch.finished_job(compose_job("quant=kmeans", "quant.kmeans_per_channel=true"), tmp_path)
    # A VGG-16 job of runs A-G (no distillation; the config distils since run H, at 1.0 since run J) is kept when
    # relaunched with the docs' trainer.distill=0, and told what differs without it.
    vgg = compose_job("experiment=paper_vgg16_cifar10", *old_vgg, "trainer.distill=0")
    earlier = OmegaConf.to_container(vgg, resolve=True)
    del earlier["trainer"]["distill"], earlier["trainer"]["distill_temperature"], earlier["trainer"]["teacher"]
    (tmp_path / "manifest.json").write_text(json.dumps({"config": earlier}))
    assert relaunch.finished_job(vgg, tmp_path) == {"status": "ok", "acc_final": 0.9}
    with pytest.raises(ValueError, match="this launch has trainer.distill=1.0"):
        relaunch.finished_job(compose_job("experiment=paper_vgg16_cifar10", *old_vgg), tmp_path)


def test_job_defaults_fill_only_what_the_user_left_empty() -> None:
    cfg = compose_job("prune=agp", "quant=linear")
    overrides = [
        "prune.final_sparsity=0.9",
        "logger.mode=online",
        "hydra.sweep.dir=/x",
        "trainer.init_from=shared",
        "model.name=" + "x" * 80,
    ]
    naming.job_defaults(cfg, overrides, Path("/runs/multirun/default/2026-11-28_12-00-00"))
    assert cfg.logger.group == "default/2026-11-28_12-00-00" and cfg.logger.job_type == "agp+linear"
    assert list(cfg.logger.tags) == ["prune.final_sparsity=0.9", ("model.name=" + "x" * 80)[:64]]
    mine = compose_job("logger.group=mine", "logger.job_type=study", "logger.tags=[a]")
    naming.job_defaults(mine, ["seed=1"], Path("/s/t"))
    assert (mine.logger.group, mine.logger.job_type, list(mine.logger.tags)) == ("mine", "study", ["a"])
    single = compose_job("prune=none", "quant=none", "name=study")
    naming.job_defaults(single, ["seed=1", "hydra.run.dir=/x"], None)  # a single run: its experiment's group
    assert (single.logger.group, single.logger.job_type, list(single.logger.tags)) == ("study", "dense", ["seed=1"])


def test_claim_gpu_gives_jobs_running_at_once_different_gpus(tmp_path: Path) -> None:
    with gpus.claim_gpu(2, job_num=0, lock_dir=tmp_path) as a, gpus.claim_gpu(2, job_num=0, lock_dir=tmp_path) as b:
        assert (a, b) == (0, 1)
        with gpus.claim_gpu(2, job_num=3, lock_dir=tmp_path) as c:
            assert c == 1  # all taken: shares job_num % n_gpus
    with gpus.claim_gpu(2, job_num=0, lock_dir=tmp_path) as a:  # released when the job ended
        assert a == 0
    with gpus.claim_gpu(3, job_num=4, lock_dir=tmp_path) as a, gpus.claim_gpu(3, job_num=4, lock_dir=tmp_path) as b:
        assert (a, b) == (1, 2)  # a serial sweep spreads: start at job_num % n_gpus
    with gpus.claim_gpu(1, job_num=5, lock_dir=tmp_path) as only, gpus.claim_gpu(0, job_num=5) as none:
        assert (only, none) == (0, None)


def hydra_node(*overrides: str):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose("config", overrides=list(overrides), return_hydra_config=True).hydra


def test_paper_grid_is_sparsity_x_bits_x_method() -> None:
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("config", overrides=["experiment=paper_grid"], return_hydra_config=True)
    params = {k: str(v).split(",") for k, v in cfg.hydra.sweeper.params.items()}
    assert params == {
        "prune.final_sparsity": ["0.5", "0.7", "0.9", "0.95"],
        "quant.bits": ["2", "4", "8"],
        "quant": ["linear", "kmeans"],
    }
    assert (cfg.prune.method, cfg.quant.method, cfg.trainer.init_from) == ("agp", "linear", "shared")
    # Every job of the grid composes and validates (the sweeper's group choice wins over the study's).
    from sparsebench.config import validate

    for quant in params["quant"]:
        job = compose_job("experiment=paper_grid", f"quant={quant}", "quant.bits=2", "prune.final_sparsity=0.95")
        validate(job)
        assert (job.quant.method, job.quant.bits, job.prune.final_sparsity) == (quant, 2, 0.95)


@pytest.mark.parametrize("study", ["paper_lenet5_mnist", "paper_vgg16_cifar10", "paper_resnet18_cifar10"])
def test_paper_study_grid_is_sparsity_x_weight_format(study: str) -> None:
    hydra = hydra_node(f"experiment={study}")
    params = {k: str(v).split(",") for k, v in hydra.sweeper.params.items()}
    assert params == {
        "prune.final_sparsity": ["0", "0.8", "0.9", "0.95"],
        "weights": ["fp32", "linear8", "linear4", "kmeans4"],
        "trainer.init_from": ["shared"],
    }
    from sparsebench.config import validate

    formats = {"fp32": ("none", 32), "linear8": ("linear", 8), "linear4": ("linear", 4), "kmeans4": ("kmeans", 4)}
    for weights, (method, bits) in formats.items():
        job = compose_job(f"experiment={study}", f"weights={weights}", "prune.final_sparsity=0")
        validate(job)
        assert (job.quant.method, job.quant.bits, job.prune.method) == (method, bits, "agp")


def test_paper_grid_from_one_dense_model_with_a_dense_point(tmp_path: Path) -> None:
    """Sparsity 0 x fp32 is the dense model itself; the other points compress it."""
    done = run_cli(
        "-m",
        "experiment=paper_lenet5_mnist",
        "data=digits",
        "model=convnet",
        "data.on_device=false",
        *COMPRESS,
        "prune.final_sparsity=0,0.9",
        "weights=fp32,kmeans4",
        f"hydra.sweep.dir={tmp_path}",
    )
    assert done.returncode == 0, done.stderr[-2000:]
    rows = {r["num"] or "dense": r for r in summary(tmp_path)}
    assert len(list(tmp_path.glob("dense-*/dense.pt"))) == 1
    assert [(rows[k]["method"], rows[k]["bits"]) for k in ("dense", "0", "1", "2", "3")] == [
        ("dense", "32"),
        ("dense", "32"),
        ("kmeans", "4"),
        ("agp", "32"),
        ("agp+kmeans", "4"),
    ]
    assert rows["0"]["acc_final"] == rows["0"]["acc_dense"] == rows["dense"]["acc_final"]
    assert float(rows["0"]["sparsity"]) == 0 and float(rows["3"]["sparsity"]) == pytest.approx(0.9, abs=0.01)
    assert float(rows["3"]["compression"]) > float(rows["2"]["compression"]) > float(rows["1"]["compression"]) > 1


def test_launcher_configs_compose() -> None:
    parallel = hydra_node("hydra/launcher=parallel").launcher
    assert parallel._target_.endswith("JoblibLauncher") and parallel.batch_size == "1"  # joblib takes it as a string
    assert OmegaConf.to_container(parallel, resolve=True)["n_jobs"] == (torch.cuda.device_count() or 2)
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    slurm = hydra_node("hydra/launcher=slurm", "hydra.launcher.partition=gpu").launcher
    assert slurm._target_.endswith("SlurmLauncher")
    assert (slurm.partition, slurm.gpus_per_node, slurm.tasks_per_node) == ("gpu", 1, 1)


def test_parallel_launcher_runs_jobs_in_worker_processes(tmp_path: Path) -> None:
    done = run_cli("-m", "hydra/launcher=parallel", *DENSE, "seed=0,1", f"hydra.sweep.dir={tmp_path}")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Joblib.Parallel(n_jobs=2" in done.stderr + done.stdout
    metrics = [json.loads((j / "metrics.json").read_text()) for j in jobs_of(tmp_path)]
    assert [m["status"] for m in metrics] == ["ok", "ok"] and [r["status"] for r in summary(tmp_path)] == ["ok", "ok"]


def test_job_folder_names_stay_short_and_distinct() -> None:
    from sparsebench.multirun.naming import job_dirname

    assert job_dirname("prune.final_sparsity=0.9,quant.bits=4") == "prune.final_sparsity=0.9,quant.bits=4"
    fixed = ",".join(f"key{i}=value{i}" for i in range(30))  # 30 fixed overrides: ~400 characters
    a, b = job_dirname(fixed + ",quant.bits=4"), job_dirname(fixed + ",quant.bits=8")
    assert len(a) == len(b) == 200 and a != b and a[:180] == b[:180]
    assert job_dirname(fixed + ",quant.bits=4") == a  # stable, so a resumed sweep finds its folders
    assert "/" not in job_dirname("data.path=/a/b.npz")


def test_a_sweep_through_submitit_runs_the_slurm_code_path(tmp_path: Path) -> None:
    # submitit_local pickles each job and runs it in a subprocess, as the SLURM launcher does on a
    # cluster; the callback then reports in the launching process, and a failed job sets its exit status.
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    done = run_cli(
        "-m",
        "hydra/launcher=submitit_local",
        *COMPRESS,
        "trainer.lr=0.05,-1",
        f"hydra.sweep.dir={tmp_path}",
        "hydra.launcher.timeout_min=10",
    )
    assert done.returncode == 1, done.stderr[-3000:]
    assert "sweep: 1 of 2 jobs failed (job 1)" in done.stderr
    jobs = jobs_of(tmp_path)
    metrics = [json.loads((j / "metrics.json").read_text()) for j in jobs]
    assert [m["status"] for m in metrics] == ["ok", "failed"] and metrics[0]["acc_final"] > 0.2
    assert "trainer.lr=-1" in metrics[1]["error"]
    with open(tmp_path / "summary.csv") as f:
        assert sorted(row["status"] for row in csv.DictReader(f)) == ["failed", "ok"]
