import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmark"))
import run as benchmark  # noqa: E402


def args_for(tmp_path):
    """What `benchmark/run.py --tasks grid --latents discrete --seeds 0 1` parses, in tmp_path."""
    return benchmark.argparse.Namespace(runs=str(tmp_path / "runs"), records=str(tmp_path / "records"),
                                        report=str(tmp_path / "results.md"), tasks=["grid"], latents=["discrete"],
                                        seeds=[0, 1], references=[], jobs=2, device="auto", report_only=True,
                                        stage1=False, mixtures=list(benchmark.MIXTURES))


def finish(folder, config, metrics, ckpt=True):
    os.makedirs(folder, exist_ok=True)
    for name, record in (("config.json", config), ("metrics.json", metrics)):
        with open(os.path.join(folder, name), "w") as f:
            json.dump(record, f)
    if ckpt:
        open(os.path.join(folder, "ckpt.pt"), "w").close()
    if "latent" not in config and not os.path.exists(os.path.join(folder, "log.jsonl")):  # a base: its last evaluation
        with open(os.path.join(folder, "log.jsonl"), "w") as f:
            f.write(json.dumps({"step": config["steps"], **metrics}) + "\n")


def at(config, started):
    """A config as recorded by a run started at `started`."""
    return {**config, "machine": {"name": "cpu", "threads": 1, "started": started, "command": "python ..."}}


BASE = ({**vars(benchmark.BaseConfig()), "task": "grid", "steps": 3500,
         "task_revision": benchmark.get_task("grid").revision},
        {"answer_accuracy": 0.99, "parse_rate": 1.0, "strategy_tv": 0.02, "strategy_tv_per_input": 0.03,
         "excess_nll": 0.01, "train_seconds": 480.0})


def stage2(seed, alignment, **changed):
    return ({**benchmark.recipe_settings("grid", "discrete"), "task": "grid", "latent": "discrete", "seed": seed,
             "revision": benchmark.REVISIONS["discrete"], **changed},
            {"alignment_one_to_one": alignment, "local_strategy_full_coverage_rate": 0.9,
             "router/answer_accuracy": 0.99, "eval_inputs": 500, "train_seconds": 180.0})


def test_finished_runs_become_records_and_the_report_is_rewritten_the_same(tmp_path):
    args = args_for(tmp_path)
    finish(os.path.join(args.runs, "grid_pathfinding", "base"), *BASE)
    assert [j[0] for j in benchmark.pending_jobs(args)] == ["grid-discrete-seed0", "grid-discrete-seed1"]
    finish(os.path.join(args.runs, "grid_pathfinding", "discrete_seed0"), *stage2(0, 0.8))
    finish(os.path.join(args.runs, "grid_pathfinding", "discrete_seed1"), *stage2(1, 1.0))
    assert benchmark.pending_jobs(args) == []
    benchmark.write_report(args)
    first = open(args.report).read()
    assert "| **min** | | | | | | | | 0.800 | 0.900 | 0.990 | 1 of 2 |" in first
    assert "| **mean** | | | | | | | | 0.900 |" in first
    benchmark.write_report(args)
    assert open(args.report).read() == first


def test_a_base_record_names_where_its_curve_first_met_all_four_targets(tmp_path):
    args = args_for(tmp_path)
    folder = os.path.join(args.runs, "grid_pathfinding", "base")
    os.makedirs(folder)
    with open(os.path.join(folder, "log.jsonl"), "w") as f:
        for step, acc in ((500, 0.95), (1000, 0.992), (1500, 0.985), (2500, 0.99)):
            f.write(json.dumps({**BASE[1], "step": step, "train_tokens": step * 4000, "train_seconds": step * 0.2,
                                "answer_accuracy": acc}) + "\n")
    finish(folder, *BASE)
    record = os.path.join(args.records, "grid_pathfinding", "base.json")
    benchmark.save_record(folder, record)
    assert benchmark.read(record)["first_met"] == {"step": 1000, "train_tokens": 4_000_000, "train_seconds": 200.0}
    benchmark.write_report(args)
    assert "| step 1000, 4.0M tokens, 3 min | yes |" in open(args.report).read()


def test_a_base_whose_folder_is_gone_is_trained_again_only_for_a_missing_stage2_run(tmp_path):
    args = args_for(tmp_path)
    finish(os.path.join(args.runs, "grid_pathfinding", "base"), *BASE)
    finish(os.path.join(args.runs, "grid_pathfinding", "discrete_seed0"), *stage2(0, 1.0))
    benchmark.pending_jobs(args)  # records both
    for name in ("base", "discrete_seed0"):  # the run folders are gone, the records stay
        for f in ("ckpt.pt", "metrics.json", "config.json"):
            os.remove(os.path.join(args.runs, "grid_pathfinding", name, f))
    assert [j[0] for j in benchmark.pending_jobs(args)] == ["grid-base", "grid-discrete-seed1"]
    args.seeds = [0]
    assert benchmark.pending_jobs(args) == []


def test_a_run_of_an_earlier_recipe_is_reported_apart_and_runs_again_in_a_fresh_folder(tmp_path):
    args = args_for(tmp_path)
    finish(os.path.join(args.runs, "grid_pathfinding", "base"), *BASE)
    finish(os.path.join(args.runs, "grid_pathfinding", "discrete_seed0"), *stage2(0, 1.0))
    earlier = os.path.join(args.runs, "grid_pathfinding", "discrete_seed1")
    finish(earlier, *stage2(1, 0.5, jsd=0.5))
    assert [j[0] for j in benchmark.pending_jobs(args)] == ["grid-discrete-seed1"]
    assert not os.path.exists(os.path.join(args.records, "grid_pathfinding", "discrete_seed1.json"))
    jobs = {j.name: j for j in benchmark.jobs_for(args)}
    assert benchmark.set_aside_earlier_run(jobs["grid-discrete-seed1"])
    assert not os.path.exists(earlier) and os.path.exists(earlier + ".earlier-1")  # kept, out of the way
    assert not benchmark.set_aside_earlier_run(jobs["grid-discrete-seed0"])
    with open(os.path.join(args.records, "grid_pathfinding", "discrete_seed1.json"), "w") as f:
        json.dump({"config": stage2(1, 0.5, starts=5)[0], "metrics": stage2(1, 0.5)[1]}, f)
    with open(os.path.join(args.records, "grid_pathfinding", "discrete_seed2.json"), "w") as f:
        config = stage2(2, 0.7)[0]
        del config["revision"]  # recorded before the code that computes the recipe changed
        json.dump({"config": config, "metrics": stage2(2, 0.7)[1]}, f)
    benchmark.write_report(args)
    report = open(args.report).read()
    current, earlier = report.split("Seeds 1, 2, recorded with an earlier recipe or code (it differs in revision, "
                                    "starts;")
    assert "| **min** | | | | | | | | 1.000 | 0.900 | 0.990 | 1 of 1 |" in current  # seed 0 alone
    assert "| **min** | | | | | | | | 0.500 | 0.900 | 0.990 | 0 of 2 |" in earlier  # seeds 1 and 2, apart


def test_tokens_to_target_names_the_first_evaluation_that_meets_each_target(tmp_path, capsys):
    import tokens_to_target
    evals = [(0, 0, 0.0, 0.0, 9.0, 1.0), (500, 1_000_000, 0.95, 0.999, 0.04, 0.08),
             (1000, 2_000_000, 0.992, 0.999, 0.03, 0.06), (1500, 3_000_000, 0.991, 0.998, 0.02, 0.04)]
    with open(tmp_path / "log.jsonl", "w") as f:
        for step, tokens, acc, parse, nll, tv in evals:
            f.write(json.dumps({"step": step, "train_tokens": tokens, "answer_accuracy": acc, "parse_rate": parse,
                                "excess_nll": nll, "strategy_tv": tv}) + "\n")
            f.write(json.dumps({"step": step + 50, "loss/y": 0.1}) + "\n")  # training lines are skipped
    assert tokens_to_target.main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "first meets answer_accuracy: step 1000, 2.0M tokens" in out
    assert "first meets parse_rate: step 500, 1.0M tokens" in out
    assert "first meets strategy_tv: step 1500, 3.0M tokens" in out
    assert "first meets all four: step 1500, 3.0M tokens" in out


def test_a_base_of_earlier_settings_and_the_runs_on_an_earlier_base_run_again(tmp_path):
    args = args_for(tmp_path)
    earlier_base = os.path.join(args.runs, "grid_pathfinding", "base")
    finish(earlier_base, at({**BASE[0], "exact_branches": False}, "2026-01-01 10:00"), BASE[1])
    for seed in (0, 1):
        finish(os.path.join(args.runs, "grid_pathfinding", f"discrete_seed{seed}"),
               at(stage2(seed, 1.0)[0], "2026-01-01 11:00"), stage2(seed, 1.0)[1])
    assert [j.name for j in benchmark.pending_jobs(args)] == ["grid-base"]  # its settings are not train_base's
    benchmark.save_record(earlier_base, os.path.join(args.records, "grid_pathfinding", "base.json"))  # as before
    benchmark.write_report(args)
    assert "Trained with settings of an earlier train_base.py: grid (exact_branches)" in open(args.report).read()
    jobs = {j.name: j for j in benchmark.jobs_for(args)}
    assert benchmark.set_aside_earlier_run(jobs["grid-base"]) and os.path.exists(earlier_base + ".earlier-1")
    finish(earlier_base, at(BASE[0], "2026-01-02 10:00"), BASE[1])  # trained again, after the stage-2 runs
    assert [j.name for j in benchmark.pending_jobs(args)] == ["grid-discrete-seed0", "grid-discrete-seed1"]
    benchmark.write_report(args)
    assert "Seeds 0, 1 ran on a base model of earlier settings" in open(args.report).read()
    assert benchmark.set_aside_earlier_run(jobs["grid-discrete-seed0"])
    finish(os.path.join(args.runs, "grid_pathfinding", "discrete_seed0"),
           at(stage2(0, 0.95)[0], "2026-01-02 11:00"), stage2(0, 0.95)[1])  # seed 0 again, on the new base
    assert [j.name for j in benchmark.pending_jobs(args)] == ["grid-discrete-seed1"]
    benchmark.write_report(args)
    current, on_earlier = open(args.report).read().split("Seed 1 ran on a base model of earlier settings")
    assert "| **min** | | | | | | | | 0.950 | 0.900 | 0.990 | 1 of 1 |" in current  # seed 0 alone
    assert "| **min** | | | | | | | | 1.000 | 0.900 | 0.990 | 1 of 1 |" in on_earlier  # seed 1, apart


def test_a_base_trained_again_with_the_same_settings_keeps_the_runs_on_the_one_it_replaces(tmp_path):
    args = args_for(tmp_path)
    base = os.path.join(args.runs, "grid_pathfinding", "base")
    finish(base, at(BASE[0], "2026-01-01 10:00"), BASE[1])
    finish(os.path.join(args.runs, "grid_pathfinding", "discrete_seed0"),
           at(stage2(0, 1.0)[0], "2026-01-01 11:00"), stage2(0, 1.0)[1])
    benchmark.pending_jobs(args)  # records both
    os.rename(base, base + ".gone")  # its checkpoint is lost; seed 1 needs a base model
    assert [j.name for j in benchmark.pending_jobs(args)] == ["grid-base", "grid-discrete-seed1"]
    finish(base, at(BASE[0], "2026-01-02 10:00"), BASE[1])  # trained again, on another machine
    finish(os.path.join(args.runs, "grid_pathfinding", "discrete_seed1"),
           at(stage2(1, 0.95)[0], "2026-01-02 11:00"), stage2(1, 0.95)[1])
    assert benchmark.pending_jobs(args) == []  # seed 0's record still counts
    records = os.path.join(args.records, "grid_pathfinding")
    assert os.path.exists(os.path.join(records, "base_20260101-1000.json"))  # the replaced base is kept
    benchmark.write_report(args)
    report = open(args.report).read()
    assert "| 2026-01-01 11:00 | 2026-01-01 10:00 | 1.000 |" in report  # seed 0 names the base it read
    assert "| 2026-01-02 11:00 | 2026-01-02 10:00 | 0.950 |" in report
    assert "| **min** | | | | | | | | 0.950 | 0.900 | 0.990 | 2 of 2 |" in report
    assert report.split("## Base models of stage 2")[1].count("| grid_pathfinding |") == 2  # both base models


def test_a_task_of_a_later_revision_trains_its_base_again(tmp_path, monkeypatch):
    args = args_for(tmp_path)
    finish(os.path.join(args.runs, "grid_pathfinding", "base"), *BASE)
    finish(os.path.join(args.runs, "grid_pathfinding", "discrete_seed0"), *stage2(0, 1.0))
    finish(os.path.join(args.runs, "grid_pathfinding", "discrete_seed1"), *stage2(1, 1.0))
    assert benchmark.pending_jobs(args) == []
    grid = benchmark.get_task("grid").__class__
    monkeypatch.setattr(grid, "revision", grid.revision + 1)  # grid writes something new
    assert [j.name for j in benchmark.pending_jobs(args)] == ["grid-base", "grid-discrete-seed0", "grid-discrete-seed1"]


def continuous(seed, sampled_z, reference=""):
    return ({**benchmark.recipe_settings("grid", "continuous", reference), "task": "grid", "latent": "continuous",
             "seed": seed, "revision": benchmark.REVISIONS["continuous"]},
            {"sampled_z_probe_acc": sampled_z, "posterior_mu_probe_acc": 1.0, "router/answer_accuracy": 0.99,
             "centroid_control": {"a": 0.9, "b": 1.0}, "router_nearest_centroid_rate": sampled_z,
             "eval_inputs": 500, "train_seconds": 600.0})


def test_a_reference_runs_the_recipe_with_the_methods_setting_and_is_reported_beside_it(tmp_path):
    args = args_for(tmp_path)
    args.latents, args.references, args.seeds = ["continuous"], ["gaussian"], [0]
    finish(os.path.join(args.runs, "grid_pathfinding", "base"), *BASE)
    jobs = {j.name: j for j in benchmark.pending_jobs(args)}
    assert list(jobs) == ["grid-continuous-seed0", "grid-continuous-gaussian-seed0"]
    assert "--router gaussian" in " ".join(jobs["grid-continuous-gaussian-seed0"].command)
    assert "--router" not in jobs["grid-continuous-seed0"].command
    reference = os.path.join(args.runs, "grid_pathfinding", "continuous_gaussian_seed0")
    finish(reference, *continuous(0, 0.95))  # the mixture router in the reference's folder: not the reference
    assert [j.name for j in benchmark.pending_jobs(args)] == list(jobs)
    assert benchmark.why_earlier(jobs["grid-continuous-gaussian-seed0"]) == "settings router from an earlier recipe"
    finish(reference, *continuous(0, 0.8, "gaussian"))
    finish(os.path.join(args.runs, "grid_pathfinding", "continuous_seed0"), *continuous(0, 0.95))
    assert benchmark.pending_jobs(args) == []
    benchmark.write_report(args)
    recipe, gaussian = open(args.report).read().split("### grid_pathfinding, continuous, reference `gaussian`")
    assert "| **min** | | | | | | | | 0.950 | 1.000 | 0.990 | 0.900 | 0.950 | 1 of 1 |" in recipe
    assert "`--router gaussian`" in gaussian
    assert "| **min** | | | | | | | | 0.800 | 1.000 | 0.990 | 0.900 | 0.800 | 0 of 1 |" in gaussian


def test_stage1_with_its_defaults_is_reported_per_mixture_and_a_base_of_stage2_can_be_one(tmp_path):
    args = benchmark.argparse.Namespace(**{**vars(args_for(tmp_path)), "stage1": True})
    folder = os.path.join(args.runs, "grid_pathfinding")
    finish(os.path.join(folder, "base"), *BASE)  # `train_base.py --task grid --out ...`: stage 1's uniform default
    benchmark.save_record(os.path.join(folder, "base"), os.path.join(args.records, "grid_pathfinding", "base.json"))
    assert [j.name for j in benchmark.pending_jobs(args)] == ["grid-stage1-input-dependent"]
    job = benchmark.pending_jobs(args)[0]
    assert job.command[:5] == ["train_base.py", "--task", "grid", "--mixture", "input-dependent"]
    shorter = {**BASE[0], "mixture": "input-dependent", "steps": 2500}  # not the task's TASK_STEPS
    finish(job.folder, at(shorter, "2026-12-06 03:00"), BASE[1])
    assert [j.name for j in benchmark.pending_jobs(args)] == ["grid-stage1-input-dependent"]
    assert benchmark.set_aside_earlier_run(job) and os.path.exists(job.folder + ".earlier-1")
    finish(job.folder, at({**shorter, "steps": 3500}, "2026-12-06 04:00"), {**BASE[1], "answer_accuracy": 0.95})
    assert benchmark.pending_jobs(args) == []
    benchmark.write_report(args)
    stage1 = open(args.report).read().split("## Stage 1 with its defaults")[1].split("## Base models of stage 2")[0]
    assert "| grid_pathfinding | uniform |" in stage1 and "| 0.990 | 1.000 |" in stage1
    assert "| grid_pathfinding | input-dependent |" in stage1 and "| 0.950 | 1.000 |" in stage1
    assert stage1.count("| yes |") == 1 and "grid (uniform)" not in stage1  # not among those not recorded
    again = os.path.join(folder, "stage1_uniform")  # the same command on another machine: a row of its own
    finish(again, at(BASE[0], "2026-12-06 05:00"), {**BASE[1], "answer_accuracy": 0.97})
    benchmark.sync_records(args)
    benchmark.write_report(args)
    stage1 = open(args.report).read().split("## Stage 1 with its defaults")[1].split("## Base models of stage 2")[0]
    uniform = [row for row in stage1.splitlines() if row.startswith("| grid_pathfinding | uniform |")]
    assert len(uniform) == 2 and "| 0.970 |" in uniform[0] and "| 0.990 |" in uniform[1]  # newest first


def test_a_task_revision_of_one_mixture_leaves_the_other_mixtures_records_current():
    uniform, input_dependent = (benchmark.get_task("base", mixture=m) for m in ("uniform", "input-dependent"))
    assert uniform.revision != input_dependent.revision  # only the input-dependent mixture changed what it favours
    config = {**vars(benchmark.BaseConfig()), "task": "base_conversion",
              "steps": benchmark.TASK_STEPS["base_conversion"]}
    assert benchmark.stage1_default({**config, "task_revision": uniform.revision})
    assert benchmark.stage1_default({**config, "mixture": "input-dependent", "task_revision": input_dependent.revision})
    assert not benchmark.stage1_default({**config, "mixture": "input-dependent", "task_revision": uniform.revision})
