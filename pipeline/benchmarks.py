"""Zero-shot benchmarks through EleutherAI's lm-evaluation-harness (`lm-eval`), its own task definitions and
scoring, on an arm's saved model.

Two kinds of task:
  - the harness's registered tasks (lambada_openai, piqa, ...), their datasets read offline from
    benchmarks.hf_cache_dir at the commits refs.lock.yaml records, stored there by `python -m pipeline fetch`
    (the repository snapshot, loaded by `datasets` as a local directory, and its prepared tables);
  - LOCAL_TASK, a LAMBADA-style last-word task defined here in the harness's YAML format over a JSON Lines
    file the data stage writes from the test split (context: a passage; target: its final word), so the
    embedded default exercises the same harness code path with no download.

The per-item log-likelihoods the harness computes equal `continuation_logprob` (the pipeline's own scorer)
on the same items (tests/test_benchmarks.py)."""
from __future__ import annotations

import functools
import json
import re
from pathlib import Path

from .params import LOCAL_TASK

ITEMS_FILE = "lastword.jsonl"
LAST_WORD = re.compile(r"(?s)^(.*\S) ([A-Za-z]{2,})[^\w\s]*$")   # a passage ending in " word" (+ punctuation)
# what the harness's results hold that varies between identical runs (time, host, environment, paths)
VOLATILE_RESULT_KEYS = ("date", "start_time", "end_time", "total_evaluation_time_seconds", "pretty_env_info",
                        "git_hash", "upper_git_hash", "config", "configs")   # configs: paths of the YAML files


def lastword_items(texts: list[str], tokenizer, max_tokens: int, limit: int, min_words: int = 12) -> list[dict]:
    """LAMBADA-style items from documents, in document order: every paragraph of at least `min_words` words
    whose last word (2+ letters, before trailing punctuation) is the target, the text before it the context;
    only those whose context and target fit in `max_tokens` tokens (no truncation), at most `limit` (0: all)."""
    items = []
    for text in texts:
        for paragraph in text.split("\n\n"):
            match = LAST_WORD.match(paragraph.strip())
            if not match or len(paragraph.split()) < min_words:
                continue
            context, target = match.group(1), match.group(2)
            if len(tokenizer(context + " " + target, add_special_tokens=False)["input_ids"]) > max_tokens:
                continue
            items.append({"context": context, "target": target})
            if len(items) == limit:
                return items
    return items


def write_items(path: Path, items: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(item, sort_keys=True) + "\n" for item in items))


def local_task_yaml(items_file: Path) -> str:
    """The harness task definition of LOCAL_TASK over an items file (as lambada_openai: log-likelihood of
    " target" after the context; acc = the target is the greedy continuation; perplexity over items)."""
    return "\n".join([
        f"task: {LOCAL_TASK}",
        "dataset_path: json",
        "dataset_kwargs:",
        "  data_files:",
        f"    test: {json.dumps(str(Path(items_file).resolve()))}",
        "output_type: loglikelihood",
        "test_split: test",
        'doc_to_text: "{{context}}"',
        "doc_to_target: \"{{' ' + target}}\"",
        "metric_list:",
        "  - metric: perplexity",
        "    aggregation: perplexity",
        "    higher_is_better: false",
        "  - metric: acc",
        "    aggregation: mean",
        "    higher_is_better: true",
        "metadata:",
        "  version: 1.0",
        ""])


def task_manager(tasks: list[str], task_dir: Path | None):
    """The harness's task index over task_dir (None: none), and over its own task definitions only when a harness
    task is requested (indexing its thousands of YAML files takes seconds)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=None if task_dir is None else str(task_dir),
                       include_defaults=any(t != LOCAL_TASK for t in tasks))


@functools.lru_cache(maxsize=1)
def harness_task_files() -> dict[str, list[Path]]:
    """Task name -> the lm-eval YAML files that define it (`task: NAME`), by a text scan of the harness's task
    directory: ~1 s, where building its TaskManager index parses every file (~15 s)."""
    import lm_eval

    found: dict[str, list[Path]] = {}
    for path in sorted((Path(lm_eval.__file__).parent / "tasks").rglob("*.yaml")):
        match = re.search(r"^task:\s*(\S+)\s*$", path.read_text(errors="ignore"), re.M)
        if match:
            found.setdefault(match.group(1), []).append(path)
    return found


def harness_task_config(task: str) -> dict:
    """A harness task's definition, includes resolved (the task index when a name is defined twice)."""
    from lm_eval.tasks._yaml_loader import load_yaml

    files = harness_task_files().get(task, [])
    if len(files) != 1:
        return task_config(task, task_manager([task], None))
    return load_yaml(files[0], resolve_func=False)


def task_caches(b) -> tuple[Path, Path]:
    """(hub snapshots, prepared tables) of the harness tasks' datasets: benchmarks.hf_cache_dir/{hub,datasets}."""
    from .hub import cache_dir

    root = cache_dir(b.hf_cache_dir, "benchmarks.hf_cache_dir")
    return root / "hub", root / "datasets"


def task_snapshot(entry: dict, b) -> Path:
    """A task dataset's snapshot at refs.lock.yaml's commit, each file fetch recorded verified against its blob."""
    from . import hub

    repo = hub.Repo("dataset", entry["repo"], entry["commit"], task_caches(b)[0])
    if not entry.get("files"):
        raise hub.MissingFromCache(f"{repo}: refs.lock.yaml records no files; {hub.FETCH_HINT}")
    for name in entry["files"]:
        hub.resolve_file(repo, name)
    return repo.snapshot


def task_specs(tasks: list[str], snapshots: dict[str, Path], prepared: Path, manager) -> list:
    """The task list for simple_evaluate: the local task by name, each harness task as its registered config
    reading its dataset from the local snapshot (`datasets` loads a directory offline) with the prepared tables
    in `prepared`; never a loading script or remote code."""
    from lm_eval.tasks._yaml_loader import load_yaml

    specs = []
    for task in tasks:
        if task == LOCAL_TASK:
            specs.append(task)
            continue
        config = load_yaml(task_yaml(task, manager), resolve_func=True)
        config["dataset_path"] = str(snapshots[task])
        kwargs = {k: v for k, v in (config.get("dataset_kwargs") or {}).items() if k not in ("revision", "trust_remote_code")}
        config["dataset_kwargs"] = {**kwargs, "cache_dir": str(prepared)}
        specs.append(config)
    return specs


def task_yaml(task: str, manager) -> str:
    entry = manager.task_index.get(task)
    if entry is None or entry.yaml_path is None:
        raise ValueError(f"benchmarks.tasks: {task!r} is not a task defined by a YAML file in lm-eval")
    return entry.yaml_path


def task_config(task: str, manager) -> dict:
    from lm_eval.tasks._yaml_loader import load_yaml

    return load_yaml(task_yaml(task, manager), resolve_func=False)




def run_harness(model, tokenizer, specs: list, manager, *, num_fewshot: int, limit: int, batch_size: int,
                bootstrap_iters: int, seed: int) -> dict:
    """simple_evaluate on an already loaded model (where it is: the device policy placed it), per-item
    samples logged, every random seed of the harness set. Returns the harness's results dict."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(model.device))
    return simple_evaluate(model=lm, tasks=specs, num_fewshot=num_fewshot, limit=limit or None,
                           task_manager=manager, log_samples=True, bootstrap_iters=bootstrap_iters,
                           random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
                           fewshot_random_seed=seed)


def stable_results(results: dict) -> tuple[dict, dict]:
    """(the harness's results minus what varies between identical runs, the volatile part) — the first goes
    into the hashed output, the second into the run record."""
    stable = {k: v for k, v in results.items() if k not in VOLATILE_RESULT_KEYS}
    stable["samples"] = {task: [{k: v for k, v in row.items() if k not in ("doc", "arguments")} for row in rows]
                         for task, rows in results.get("samples", {}).items()}
    return stable, {k: results[k] for k in VOLATILE_RESULT_KEYS if k in results}


def flat_metrics(results: dict) -> dict:
    """{task: {metric: value}} with the harness's "metric,filter" keys kept as they are, plus per-item scores
    for the report's bootstrap: {task: {"items": [{doc_id, acc, loglikelihood (single-request tasks)}]}}."""
    out = {}
    for task, metrics in results["results"].items():
        row = {k: v for k, v in metrics.items() if k not in ("name", "alias") and isinstance(v, (int, float))}
        row["items"] = [item_scores(s) for s in results.get("samples", {}).get(task, [])]
        out[task] = row
    return out


def item_scores(sample: dict) -> dict:
    scores = {"doc_id": int(sample["doc_id"]), "acc": float(sample["acc"])}
    if len(sample["filtered_resps"]) == 1:      # a log-likelihood task: one (log-likelihood, is greedy) request
        scores["loglikelihood"] = float(sample["filtered_resps"][0][0])
    return scores


def continuation_logprob(model, tokenizer, context: str, continuation: str) -> tuple[float, bool]:
    """The pipeline's own scorer: log P(continuation | context) summed over the continuation's tokens, and
    whether every continuation token is the greedy prediction. Tokenized as the harness does: the pair is
    encoded whole and split where the context's own encoding ends (trailing spaces move to the continuation)."""
    import torch

    spaces = len(context) - len(context.rstrip())
    context, continuation = context[: len(context) - spaces], context[len(context) - spaces:] + continuation
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    n_context = len(tokenizer(context, add_special_tokens=False)["input_ids"])
    ids = torch.tensor([whole], device=model.device)
    with torch.no_grad():
        logprobs = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), dim=-1)
    targets = ids[0, n_context:]
    picked = logprobs[n_context - 1:].gather(1, targets.unsqueeze(1)).squeeze(1)
    greedy = bool((logprobs[n_context - 1:].argmax(dim=-1) == targets).all())
    return float(picked.sum()), greedy
