"""
The benchmark: train the base models and the stage-2 recipes of a list of (task, latent, seed)
runs, then write docs/results.md from their records. Finished runs are skipped, stopped ones
resumed, so running it again costs only what is missing and rewrites the same file.

    python benchmark/run.py                                    # the default sweep, 2 jobs on a 2-core CPU
    python benchmark/run.py --tasks grid --latents discrete --seeds 0 1 2
    python benchmark/run.py --device cuda --jobs 8             # a GPU: every run at once
    python benchmark/run.py --report-only                      # only records and docs/results.md
    python benchmark/run.py --latents continuous --seeds 0 --references gaussian   # beside the method's router
    python benchmark/run.py --stage1 --tasks sum sort grid linear base add    # stage 1 with its defaults

Run folders: runs/benchmark/<task>/base, runs/benchmark/<task>/<latent>_seed<S> and, for a
reference (--references: the recipe with one setting of the method put back, REFERENCES),
runs/benchmark/<task>/<latent>_<reference>_seed<S>; logs in
runs/benchmark/logs/. Each job gets cores / jobs threads (or --threads). When a run finishes, its
config.json and metrics.json are copied to benchmark/records/<task>/<run>.json, which is kept with
the code: the report is written from the records, so a table can grow over sweeps on different
machines, and a base model whose folder is gone is trained again only when a stage-2 run still
needs it. A base record counts only while its settings are train_base.py's defaults and its task's
revision the current one, a stage-2 record only while its settings are the current recipe's
(disentangle.RECIPES) and the base model it ran on counts: after either changes, the runs are run
again, the earlier folder kept as <run>.earlier-N, and until then the report shows their records
apart. A base model trained again with the same settings (its folder gone, or on another machine)
replaces base.json; the record it replaces is kept as base_<started>.json, and the stage-2 records
that ran on it still count, each table row naming the base it ran on.

--stage1 runs `train_base.py --task T --mixture M` with no other flag for each task and mixture
(--mixtures) in runs/benchmark/<task>/stage1_<mixture>, unless a record of that command with the
current defaults exists: a base model of stage 2 trained with none but --out is one.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from typing import NamedTuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from disentangle import REVISIONS, Config as Stage2Config, apply_recipe  # noqa: E402
from model import write_json  # noqa: E402
from tasks import get_task  # noqa: E402
from train_base import TASK_STEPS, Config as BaseConfig  # noqa: E402

# the base model each task's stage 2 starts from (2-digit addition: the recipe's base, which meets
# the targets in 8,000 steps, TASK_STEPS being for the default 3 digits; base conversion: the
# 10,000-step base its stage-2 records ran on)
BASE_ARGS = {"grid": [], "linear": [], "add": ["--task-options", "n_digits=2", "--steps", "8000"], "sort": [],
             "sum": [], "base": ["--steps", "10000"]}
DEFAULT_TASKS = ("grid", "linear", "add", "sort")
MIXTURES = ("uniform", "input-dependent")  # p*(s|x) of the stage-1 runs of --stage1
DEFAULT_LATENTS, DEFAULT_SEEDS = ("discrete", "continuous"), (0, 1, 2)
# a reference: the recipe of a latent with the method's own setting where the recipe departs from it,
# run on the same base model and seeds to show what the departure buys
REFERENCES = {"gaussian": ("continuous", {"router": "gaussian"})}  # the single Gaussian router p(z|x)
TARGETS = {  # key -> (">=" or "<=", the bound that meets the target) (docs/metrics.md)
    "base": {"answer_accuracy": (">=", 0.99), "parse_rate": (">=", 0.995), "excess_nll": ("<=", 0.05),
             "strategy_tv": ("<=", 0.05)},
    "discrete": {"alignment_one_to_one": (">=", 0.9), "local_strategy_full_coverage_rate": (">=", 0.8),
                 "router/answer_accuracy": (">=", 0.98)},
    "continuous": {"sampled_z_probe_acc": (">=", 0.9), "posterior_mu_probe_acc": (">=", 0.95),
                   "router/answer_accuracy": (">=", 0.98), "lowest_centroid_control": (">=", 0.8)},
}
# shown beside the targets: the share of router draws that land on a cluster of the posterior
DIAGNOSTICS = {"continuous": ["router_nearest_centroid_rate"]}


def reference_settings(reference):
    """The settings a reference puts back ({} for the recipe itself)."""
    return REFERENCES[reference][1] if reference else {}


def as_flags(settings):
    return [flag for name, value in settings.items() for flag in (f"--{name.replace('_', '-')}", str(value))]


def meets(values, key, target):
    op, bound = target
    return values[key] >= bound if op == ">=" else values[key] <= bound


def meets_all(values, kind):
    return all(meets(values, key, target) for key, target in TARGETS[kind].items())


def evaluations(folder):
    """The evaluation records of a stage-1 run's log.jsonl (those with answer_accuracy), in step order."""
    path = os.path.join(folder, "log.jsonl")
    if not os.path.exists(path):
        raise ValueError(f"{folder} has no log.jsonl: give a stage-1 run folder")
    with open(path) as f:
        records = [json.loads(line) for line in f if line.strip()]
    return [r for r in records if "answer_accuracy" in r]


def first_meeting(evals, keys):
    """The first evaluation that meets every target in keys (stage-1 targets), or None."""
    return next((r for r in evals if all(meets(r, k, TARGETS["base"][k]) for k in keys)), None)


def where_met(first):
    """'step 4500, 11.0M tokens, 19 min' for a first_meeting record ('not met' for None)."""
    if first is None:
        return "not met"
    tokens = f", {first['train_tokens'] / 1e6:.1f}M tokens" if "train_tokens" in first else ""
    minutes = f", {first['train_seconds'] / 60:.0f} min" if "train_seconds" in first else ""  # logged since 2026-12-06
    return f"step {first['step']}{tokens}{minutes}"


# settings that say where and how a run ran, not what it computes; precision follows the hardware
NOT_RECIPE = {"task", "latent", "seed", "base", "out", "device", "resume", "precision", "machine"}


def recipe_settings(task, latent, reference=""):
    """The resolved settings of `disentangle.py --task TASK --latent LATENT` with no other flag (and
    a reference's flags), less those it does not read (Config.ignored)."""
    cfg = Stage2Config(task=task, latent=latent)
    apply_recipe(cfg, given=set())
    for name, value in reference_settings(reference).items():
        setattr(cfg, name, value)
    cfg.k = cfg.k or len(get_task(task).strategies)  # config.json has K resolved
    return {k: v for k, v in vars(cfg).items() if k not in NOT_RECIPE and k not in cfg.ignored()}


def earlier_recipe(config, task, latent, reference=""):
    """The settings in which a stage-2 run's config differs from the current recipe (a setting
    added since the run counts as its default, which is what the code did before it existed), and
    "revision" where it ran on code that computed it differently (disentangle.REVISIONS)."""
    defaults = vars(Stage2Config())
    differ = sorted(k for k, v in recipe_settings(task, latent, reference).items()
                    if config.get(k, defaults[k]) != v)
    return differ + (["revision"] if config.get("revision", 1) != REVISIONS[latent] else [])


# train_base.py settings that say where, how long or how often, not what a base model learns
BASE_NOT_RECIPE = {"task", "out", "device", "resume", "precision", "steps", "task_options", "eval_interval",
                   "eval_inputs", "final_inputs", "probe_inputs", "log_interval"}
# train_base.py settings added since some base records were made, as the code ran before them
BASE_BEFORE = {"exact_branches": False}


def earlier_base_settings(config):
    """The settings in which a base run's config differs from `train_base.py`'s defaults, and
    "task_revision" where its task has changed what it writes since (tasks.Task.revision)."""
    defaults = vars(BaseConfig())
    differ = sorted(k for k, v in defaults.items()
                    if k not in BASE_NOT_RECIPE and config.get(k, BASE_BEFORE.get(k, v)) != v)
    task = get_task(config["task"], mixture=config.get("mixture", "uniform"))
    return differ + (["task_revision"] if config.get("task_revision", 1) != task.revision else [])


def stage1_default(config):
    """Whether a base run is `python train_base.py --task T --mixture M` with no other flag: train_base.py's
    defaults, the task's default options and TASK_STEPS, and its task's current revision."""
    return (set(earlier_base_settings(config)) <= {"mixture"} and not config.get("task_options")
            and config["steps"] == TASK_STEPS[get_task(config["task"]).name])


def current(config, task, latent, reference=""):
    if latent is None:
        return not earlier_base_settings(config)
    return not earlier_recipe(config, task, latent, reference)


def started(config):
    return (config or {}).get("machine", {}).get("started", "")


def records_named(folder, stem):
    """The records <stem>.json and <stem>_<started>.json (those it replaced) of a task's record
    folder, newest first."""
    names = os.listdir(folder) if os.path.isdir(folder) else []
    found = [read(os.path.join(folder, n)) for n in names
             if n == f"{stem}.json" or (n.startswith(f"{stem}_") and n.endswith(".json"))]
    found = [r for r in found if r and r.get("config") and r.get("metrics")]
    return sorted(found, key=lambda r: started(r["config"]), reverse=True)


def base_records(folder):
    """The records of every base model of stage 2 in a task's record folder, newest first."""
    return records_named(folder, "base")


def stage1_records(folder, mixture):
    """The records of a task's stage-1 runs with their defaults and this mixture, newest first: a
    base model of stage 2 is one where it ran with none but --out (the stage1_<mixture> records
    are those of --stage1)."""
    found = base_records(folder) + records_named(folder, f"stage1_{mixture}")
    found = [r for r in found if r["config"].get("mixture", "uniform") == mixture and stage1_default(r["config"])]
    return sorted(found, key=lambda r: started(r["config"]), reverse=True)


def base_of(folder, config):
    """The record of the base model a stage-2 run read: the latest one started before it (every run
    reads its task's latest base model), or None where none was recorded."""
    return next((r for r in base_records(folder) if started(r["config"]) <= started(config)), None)


def on_earlier_base(folder, config):
    """Whether a stage-2 run read a base model that no longer counts (earlier settings or task revision)."""
    base = base_of(folder, config)
    return base is not None and not current(base["config"], base["config"]["task"], None)


def run_name(latent=None, seed=None, reference=""):
    return "base" if latent is None else f"{latent}{'_' + reference if reference else ''}_seed{seed}"


class Job(NamedTuple):
    name: str  # e.g. grid-discrete-seed0
    folder: str  # its run folder
    record: str  # its record in benchmark/records
    command: list  # the script and its flags
    needs: str  # the base folder a stage-2 run needs (None for a base)
    task: str
    latent: str  # None for a base
    reference: str = ""  # a key of REFERENCES, or "" for the recipe
    mixture: str = ""  # a stage-1 run of --stage1: its p*(s|x); "" for the benchmark's runs


def stage1_jobs(args):
    """The Job of `train_base.py --task T --mixture M` for every task and mixture of --stage1."""
    jobs = []
    for task in args.tasks:
        name = get_task(task).name
        for mixture in args.mixtures:
            out = os.path.join(args.runs, name, f"stage1_{mixture}")
            jobs.append(Job(f"{task}-stage1-{mixture}", out, os.path.join(args.records, name, f"stage1_{mixture}.json"),
                            ["train_base.py", "--task", task, "--mixture", mixture, "--out", out], None, task, None,
                            mixture=mixture))
    return jobs


def jobs_for(args):
    """The Job of every run, bases first (with --stage1, those of stage 1 with its defaults)."""
    if args.stage1:
        return stage1_jobs(args)
    jobs = []
    for task in args.tasks:
        name = get_task(task).name
        base = os.path.join(args.runs, name, "base")
        jobs.append(Job(f"{task}-base", base, os.path.join(args.records, name, "base.json"),
                        ["train_base.py", "--task", task, "--out", base, *BASE_ARGS[task]], None, task, None))
        variants = [(latent, "") for latent in args.latents]
        variants += [(REFERENCES[ref][0], ref) for ref in args.references if REFERENCES[ref][0] in args.latents]
        for latent, reference in variants:
            flags = as_flags(reference_settings(reference))
            for seed in args.seeds:
                run = run_name(latent, seed, reference)
                out = os.path.join(args.runs, name, run)
                command = ["disentangle.py", "--task", task, "--latent", latent, *flags, "--seed", str(seed),
                           "--base", base, "--out", out]
                jobs.append(Job(f"{task}-{run.replace('_', '-')}", out, os.path.join(args.records, name, f"{run}.json"),
                                command, base, task, latent, reference))
    return jobs


def finished(folder):
    return os.path.exists(os.path.join(folder, "metrics.json"))


def recorded(record, task, latent, reference=""):
    """A record that exists and was run with the current settings (base) or recipe (stage 2) and, for
    stage 2, on the recorded base model."""
    config = (read(record) or {}).get("config")
    if config is None or not current(config, task, latent, reference):
        return False
    return latent is None or not on_earlier_base(os.path.dirname(record), config)


def done(job):
    """Whether a job has a record of the current settings: for a stage-1 job, any record of that
    task's stage-1 defaults and mixture (a base model of stage 2 can be one)."""
    if job.mixture:
        return bool(stage1_records(os.path.dirname(job.record), job.mixture))
    return recorded(job.record, job.task, job.latent, job.reference)


def why_earlier(job):
    """Why a job's run folder is not the current run ('' if it is, or there is none)."""
    config = read(os.path.join(job.folder, "config.json"))
    if config is None:
        return ""
    if job.mixture:
        return "" if stage1_default(config) else "settings other than train_base.py's defaults"
    if job.latent is None:
        earlier = earlier_base_settings(config)
        return f"settings {', '.join(earlier)} of an earlier train_base.py" if earlier else ""
    earlier = earlier_recipe(config, job.task, job.latent, job.reference)
    if earlier:
        return f"settings {', '.join(earlier)} from an earlier recipe"
    return "an earlier base model" if on_earlier_base(os.path.dirname(job.record), config) else ""


def set_aside_earlier_run(job):
    """Move a run folder of earlier settings, or of an earlier base model, to <folder>.earlier-N, so
    that the new run starts fresh and nothing is lost; returns whether there was one."""
    why = why_earlier(job)
    if not why:
        return False
    n = 1
    while os.path.exists(f"{job.folder}.earlier-{n}"):
        n += 1
    os.rename(job.folder, f"{job.folder}.earlier-{n}")
    print(f"moved {job.folder} ({why}) to {job.folder}.earlier-{n}")
    return True


def save_record(folder, record):
    """Copy a finished run's config.json and metrics.json into its record. A stage-1 record of another
    run is kept, as <base or stage1_mixture>_<its start>.json: the stage-2 records that ran on a base
    model are judged by it."""
    os.makedirs(os.path.dirname(record), exist_ok=True)
    config = read(os.path.join(folder, "config.json"))
    replaced = (read(record) or {}).get("config")
    if "latent" not in config and replaced and started(replaced) != started(config):
        stamp = started(replaced).replace("-", "").replace(":", "").replace(" ", "-")
        os.replace(record, f"{record[:-len('.json')]}_{stamp}.json")
    saved = {"config": config, "metrics": read(os.path.join(folder, "metrics.json"))}
    if "latent" not in config:  # a base model: where its curve first met all four targets
        first = first_meeting(evaluations(folder), TARGETS["base"])
        saved["first_met"] = first and {k: first[k] for k in ("step", "train_tokens", "train_seconds") if k in first}
    write_json(record, saved)


def record_base(folder, record):
    """Record a finished base model of the current settings (a no-op if it is recorded already)."""
    config = read(os.path.join(folder, "config.json"))
    if finished(folder) and config and not earlier_base_settings(config):
        save_record(folder, record)


def sync_records(args):
    """Bring the records up to date with the finished run folders."""
    for job in jobs_for(args):  # bases first, so a stage-2 run is judged against its base's new record
        if finished(job.folder) and not why_earlier(job):
            save_record(job.folder, job.record)


def pending_jobs(args):
    """The runs without a record of the current recipe, and the bases they need whose checkpoint is gone."""
    sync_records(args)
    jobs = jobs_for(args)
    missing = [j for j in jobs if not done(j)]
    needed = {j.needs for j in missing if j.needs is not None}
    gone = lambda j: not os.path.exists(os.path.join(j.folder, "ckpt.pt"))
    return [j for j in jobs if j in missing or (j.folder in needed and gone(j))]


def busy(pending, running):
    """The folders of the runs that are waiting or running: a stage-2 run waits for its base."""
    return {j.folder for j in pending} | {folder for _, folder, _, _ in running.values()}


def run_jobs(args):
    """Run what is missing, args.jobs at a time; a stopped run (a checkpoint, no metrics) resumes."""
    pending = pending_jobs(args)
    running, failed = {}, set()
    os.makedirs(os.path.join(args.runs, "logs"), exist_ok=True)
    threads = str(args.threads or max(1, (os.cpu_count() or 1) // args.jobs))
    while pending or running:
        for job in list(pending):
            name, folder, record, command, needs = job[:5]
            if len(running) >= args.jobs:
                break
            if needs in failed:
                pending.remove(job)
                failed.add(folder)
                print(f"skip  {name}: its base model failed")
            elif needs is None or (finished(needs) and needs not in busy(pending, running)):
                pending.remove(job)
                set_aside_earlier_run(job)
                if needs is not None:  # its base may have been trained by another process: record it first
                    record_base(needs, os.path.join(os.path.dirname(record), "base.json"))
                resume = ["--resume"] if os.path.exists(os.path.join(folder, "ckpt.pt")) else []
                log = open(os.path.join(args.runs, "logs", f"{name}.log"), "a")
                env = {**os.environ, "OMP_NUM_THREADS": threads}
                full = [sys.executable, *command, *(["--device", args.device] if args.device != "auto" else []), *resume]
                running[name] = (subprocess.Popen(full, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env),
                                 folder, record, time.time())
                print(f"start {name}{' (resume)' if resume else ''}")
        for name, (proc, folder, record, started) in list(running.items()):
            if proc.poll() is not None:
                del running[name]
                if proc.returncode:
                    failed.add(folder)
                else:
                    save_record(folder, record)
                print(f"{'done ' if not proc.returncode else 'FAIL '} {name} in {time.time() - started:.0f} s"
                      + (f" (exit {proc.returncode}, see {args.runs}/logs/{name}.log)" if proc.returncode else ""))
        time.sleep(2)
    return 1 if failed else 0


# ----------------------------------------------------------------------------------------------
# docs/results.md from the records


def read(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return None


def read_record(records, task, run):
    """(config, metrics) of a run's record, or (None, None)."""
    record = read(os.path.join(records, get_task(task).name, f"{run}.json")) or {}
    return record.get("config"), record.get("metrics")


def stage2_values(metrics, latent):
    values = dict(metrics)
    if latent == "continuous":
        values["lowest_centroid_control"] = min(metrics["centroid_control"].values(), default=float("nan"))
    return values


def fmt(value):
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def settings(config):
    """The resolved stage-2 settings that differ from the Config defaults and that the run read: the
    recipe as it ran."""
    defaults = vars(Stage2Config())
    skip = {"task", "latent", "seed", "base", "out", "device", "resume",
            *Stage2Config(**{k: v for k, v in config.items() if k in defaults}).ignored()}
    return ", ".join(f"{k}={v}" for k, v in config.items() if k in defaults and k not in skip and v != defaults[k])


def machine(config):
    """(machine and threads, start date); runs from before machine_info was recorded say so."""
    m = config.get("machine")
    if not m:
        return "not recorded", "not recorded"
    return f"{m['name']}, {m['threads']} threads", m["started"]


def command(config, script):
    """The command as run; for runs from before it was recorded, the shortest one with its settings."""
    if config.get("machine"):
        return config["machine"]["command"]
    flags = "--task " + config["task"] + (f" --latent {config['latent']}" if "latent" in config else "")
    return f"python {script} {flags} (reconstructed)"


BASE_KEYS = ["answer_accuracy", "parse_rate", "strategy_tv", "strategy_tv_per_input", "excess_nll"]


def base_cells(record):
    """The cells of a stage-1 record from its command to 'meets all'."""
    config, metrics = record["config"], record["metrics"]
    where, when = machine(config)
    tokens = f"{metrics['train_tokens'] / 1e6:.1f}M" if "train_tokens" in metrics else "?"  # padding excluded
    inputs = metrics.get("eval_inputs", config.get("eval_inputs", "?"))  # older runs scored on eval_inputs
    first_met = where_met(record["first_met"]) if "first_met" in record else "not recorded"
    return ([f"`{command(config, 'train_base.py')}`", str(config["steps"]), tokens, str(inputs),
             f"{metrics['train_seconds']:.0f} s", where, when] + [fmt(metrics[k]) for k in BASE_KEYS]
            + [first_met, "yes" if meets_all(metrics, "base") else "no"])


def stage1_table(records, tasks):
    """Every run of `train_base.py --task T --mixture M` with no other flag, per task and mixture, newest first."""
    rows = ["| task | p*(s\\|x) | command | steps | training tokens | inputs | wall-clock | machine | started | "
            + " | ".join(BASE_KEYS) + " | all four first met | meets all |", "|---" * (11 + len(BASE_KEYS)) + "|"]
    missing = []
    for task in tasks:
        for mixture in MIXTURES:
            found = stage1_records(os.path.join(records, get_task(task).name), mixture)
            rows += [f"| {get_task(task).name} | {mixture} | " + " | ".join(base_cells(record)) + " |"
                     for record in found]
            if not found:
                missing.append((get_task(task).alias, mixture))
    if missing:
        rows += ["", "Not recorded with the current defaults: "
                 + ", ".join(f"{alias} ({mixture})" for alias, mixture in missing)
                 + "; `python benchmark/run.py --stage1 --tasks TASK --mixtures MIXTURE` runs one."]
    return rows


def base_table(records, tasks):
    rows = ["| task | command | steps | training tokens | inputs | wall-clock | machine | started | "
            + " | ".join(BASE_KEYS) + " | all four first met | meets all |", "|---" * (10 + len(BASE_KEYS)) + "|"]
    earlier = {}  # task alias -> the settings in which its latest record differs from train_base.py's defaults
    for task in tasks:
        for age, record in enumerate(base_records(os.path.join(records, get_task(task).name))):
            stale = earlier_base_settings(record["config"])
            if stale and not age:
                earlier[get_task(task).alias] = stale
            rows.append(f"| {get_task(task).name} | " + " | ".join(base_cells(record)) + " |")
    rows += ["", "A task's newest base model is the one a new stage-2 run reads; the rows of a stage-2 table name "
             "the base model each run read by its start."]
    if earlier:
        rows += ["", "Trained with settings of an earlier train_base.py: "
                 + "; ".join(f"{alias} ({', '.join(names)})" for alias, names in earlier.items())
                 + f"; `python benchmark/run.py --tasks {' '.join(earlier)}` trains them again."]
    return rows


def seed_table(found, latent, folder):
    """The rows of one table of stage-2 runs, [(seed, config, values)], with min, mean and max;
    folder: the task's records, for the base model each run read."""
    keys = list(TARGETS[latent]) + DIAGNOSTICS.get(latent, [])
    rows = ["| seed | command | steps | inputs | wall-clock | machine | started | base model started | "
            + " | ".join(keys) + " | meets all |", "|---" * (9 + len(keys)) + "|"]
    for seed, config, values in found:
        where, when = machine(config)
        base = started((base_of(folder, config) or {}).get("config")) or "not recorded"
        meets = meets_all(values, latent)
        rows.append(f"| {seed} | `{command(config, 'disentangle.py')}` | {config['steps']} | "
                    f"{values.get('eval_inputs', '?')} | {values['train_seconds']:.0f} s | {where} | {when} | {base} | "
                    + " | ".join(fmt(values[k]) for k in keys) + f" | {'yes' if meets else 'no'} |")
    n_meet = sum(meets_all(v, latent) for _, _, v in found)
    for label, agg in (("min", min), ("mean", lambda v: sum(v) / len(v)), ("max", max)):
        cells = " | ".join(fmt(agg([v[k] for _, _, v in found])) for k in keys)
        meets = f"{n_meet} of {len(found)}" if label == "min" else ""
        rows.append(f"| **{label}** | | | | | | | | {cells} | {meets} |")
    return rows + [""]


def stage2_table(records, tasks, latent, seeds, reference=""):
    """Per task: the runs of the current recipe (or reference) on a base model that counts, then those
    on an earlier base model and those recorded with an earlier recipe, each apart (min, mean and max
    are over the runs of one table)."""
    rows = []
    for task in tasks:
        found, earlier, on_earlier = [], [], []
        folder = os.path.join(records, get_task(task).name)
        for seed in seeds:
            config, metrics = read_record(records, task, run_name(latent, seed, reference))
            if config and metrics:
                row = (seed, config, stage2_values(metrics, latent))
                if not current(config, task, latent, reference):
                    earlier.append(row)
                elif on_earlier_base(folder, config):
                    on_earlier.append(row)
                else:
                    found.append(row)
        if not (found or on_earlier or earlier):
            continue
        name, flag = get_task(task).name, f" --references {reference}" if reference else ""
        again = f"`python benchmark/run.py --tasks {get_task(task).alias} --latents {latent}{flag}`"
        seeds_text = lambda s: f"Seed{'s' * (len(s) > 1)} {', '.join(map(str, s))}"
        rows += [f"### {name}, {latent}" + (f", reference `{reference}`" if reference else ""), ""]
        if reference:
            put_back = " ".join(as_flags(reference_settings(reference)))
            rows += [f"The recipe with `{put_back}`, the method's own setting where the recipe departs from it, "
                     "on the same seeds.", ""]
        if found or on_earlier:
            rows += [f"Recipe as resolved: `{settings((found or on_earlier)[0][1])}`.", ""]
        if found:
            rows += seed_table(found, latent, folder)
        if on_earlier:
            rows += [f"{seeds_text([seed for seed, _, _ in on_earlier])} ran on a base model of earlier settings "
                     f"or an earlier task revision; {again} runs them again on the newest one.", ""]
            rows += seed_table(on_earlier, latent, folder)
        if earlier:
            differ = sorted({k for _, config, _ in earlier for k in earlier_recipe(config, task, latent, reference)})
            rows += [f"{seeds_text([seed for seed, _, _ in earlier])}, recorded with an earlier recipe or code (it "
                     f"differs in {', '.join(differ)}; {again} runs them again): `{settings(earlier[0][1])}`.", ""]
            rows += seed_table(earlier, latent, folder)
    return rows


def recorded_seeds(records, task, latent, reference=""):
    folder = os.path.join(records, get_task(task).name)
    prefix = run_name(latent, "", reference)
    names = os.listdir(folder) if os.path.isdir(folder) else []
    return sorted(int(n[len(prefix):-5]) for n in names if n.startswith(prefix) and n.endswith(".json"))


def write_report(args):
    """docs/results.md from every record there is, whatever this call ran: the same records give the same file."""
    tasks = list(BASE_ARGS)  # the tables' order
    lines = ["# Results", "",
             "Generated by `python benchmark/run.py` from the records in `benchmark/records/`; do not edit by",
             "hand. Each record is a finished run folder's config.json (the command, the resolved settings,",
             "machine and start) and metrics.json (the final evaluation and the wall-clock). Targets: "
             + "; ".join(f"{kind}: " + ", ".join(f"{k} {op} {v}" for k, (op, v) in t.items())
                         for kind, t in TARGETS.items())
             + ".", "A reference (`--references`) is the recipe with the method's own setting put back where the",
             "recipe departs from it, run on the same base models and seeds.", "",
             "## Stage 1 with its defaults", "",
             "Every run of `python train_base.py --task TASK --mixture MIXTURE` with no other flag (the task's",
             "`TASK_STEPS`), newest first, scored against that mixture's p*(s|x) on 1,000 held-out draws; the same",
             "command and seed compute differently on another machine or thread count. \"All four first met\" is",
             "the first evaluation of its curve (500 draws) that meets the four targets.", ""]
    lines += stage1_table(args.records, tasks) + ["", "## Base models of stage 2", "",
                                                 "The base model each task's stage-2 runs read (`BASE_ARGS`), and "
                                                 "those it replaced.", ""]
    lines += base_table(args.records, tasks) + [""]
    for latent in DEFAULT_LATENTS:
        lines += [f"## Stage 2, {latent} latent", ""]
        references = [""] + [ref for ref, (of, _) in REFERENCES.items() if of == latent]
        for task in tasks:
            for ref in references:
                lines += stage2_table(args.records, [task], latent, recorded_seeds(args.records, task, latent, ref), ref)
    with open(args.report, "w") as f:
        f.write("\n".join(lines).rstrip() + "\n")
    print(f"wrote {args.report}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", nargs="+", default=list(DEFAULT_TASKS), choices=list(BASE_ARGS))
    parser.add_argument("--latents", nargs="+", default=list(DEFAULT_LATENTS), choices=list(DEFAULT_LATENTS))
    parser.add_argument("--seeds", nargs="+", type=int, default=list(DEFAULT_SEEDS))
    parser.add_argument("--references", nargs="*", default=[], choices=list(REFERENCES),
                        help="also run these references of the recipe on the same seeds (REFERENCES)")
    parser.add_argument("--jobs", type=int, default=2, help="runs at once (2 on a 2-core CPU; a GPU takes many)")
    parser.add_argument("--threads", type=int, default=0,
                        help="threads per run (0: cores / jobs; 1 beside another sweep on a 2-core CPU)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or mps, passed to every run")
    parser.add_argument("--runs", default=os.path.join("runs", "benchmark"), help="where the run folders go")
    parser.add_argument("--records", default=os.path.join("benchmark", "records"),
                        help="where each finished run's config and metrics are kept")
    parser.add_argument("--report", default=os.path.join("docs", "results.md"), help="the file to write")
    parser.add_argument("--stage1", action="store_true",
                        help="run stage 1 with its defaults for each task and --mixtures instead of the stage-2 sweep")
    parser.add_argument("--mixtures", nargs="+", default=list(MIXTURES), choices=list(MIXTURES),
                        help="p*(s|x) of the --stage1 runs")
    parser.add_argument("--report-only", action="store_true",
                        help="run nothing: only update the records and write the report")
    args = parser.parse_args(argv)
    os.chdir(ROOT)  # run folders and commands relative to the repository
    if args.jobs < 1:
        parser.error(f"--jobs must be at least 1, got {args.jobs}")
    if args.threads < 0:
        parser.error(f"--threads must be 0 or more, got {args.threads}")
    if args.report_only:
        sync_records(args)
        code = 0
    else:
        code = run_jobs(args)  # which brings the records up to date first
    write_report(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
