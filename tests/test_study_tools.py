"""The study's tools under study/: reports, plots and diagnostics read what runs wrote, and refuse what they
cannot read."""

import importlib.util
import json
import sys

from torch.utils.tensorboard import SummaryWriter

from conftest import REPO, run_script_here

_spec = importlib.util.spec_from_file_location("answer_stats", REPO / "study" / "answer_stats.py")
answer_stats = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(answer_stats)


def _tool(script, *flags):
    return run_script_here(f"study/{script}", *flags)


def test_plot_runs_draws_each_tag_and_prints_first_and_last_values(tmp_path):
    runs = []
    for seed, rewards in ((1, [0.1, 0.2, 0.4]), (2, [0.0, 0.5])):
        run = tmp_path / f"run{seed}"
        with SummaryWriter(str(run)) as writer:
            for step, reward in enumerate(rewards):
                writer.add_scalar("rollout/reward_mean", reward, step)
        runs.append(str(run))
    out = tmp_path / "fig.png"
    result = _tool("plot_runs.py", "--runs", *runs, "--labels", "a", "b", "--tags", "rollout/reward_mean",
                    "eval/em_400", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert "a: rollout/reward_mean 0.100 (step 0) -> 0.400 (step 2), 3 points" in result.stdout
    assert "b: rollout/reward_mean 0.000 (step 0) -> 0.500 (step 1), 2 points" in result.stdout
    # default window 10 covers the whole of these short curves
    assert "a: rollout/reward_mean 0.100 (step 0) -> 0.400 (step 2), 3 points; mean of first/last 3: 0.233 -> 0.233; " \
           "median 0.200" in result.stdout
    assert "a: no eval/em_400" in result.stdout
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_runs_rejects_a_directory_without_events_and_mismatched_labels(tmp_path):
    result = _tool("plot_runs.py", "--runs", str(tmp_path), "--out", str(tmp_path / "x.png"))
    assert result.returncode != 0 and "holds no TensorBoard event file" in result.stderr
    result = _tool("plot_runs.py", "--runs", str(tmp_path), "--labels", "a", "b", "--out", str(tmp_path / "x.png"))
    assert result.returncode != 0 and "one --labels entry per run" in result.stderr
    result = _tool("plot_runs.py", "--runs", str(tmp_path), "--window", "0", "--out", str(tmp_path / "x.png"))
    assert result.returncode != 0 and "--window must be at least 1" in result.stderr
    assert not (tmp_path / "x.png").exists()


def _report(path, records):
    path.write_text(json.dumps({"args": {}, "results": {"llm": {"400": {"records": records}}}}))


def test_answer_stats_counts_a_collapsed_answer_distribution(tmp_path):
    def record(answer, gold):
        return {"answer": [answer], "gold": [[gold]], "em": float(answer == gold)}

    # answers collapse on "A"; gold is "A" twice, "B" three times, "C" once
    records = [record("A", "A"), record("A", "A"), record("A", "B"), record("A", "B"), record("B", "B"),
               record("D", "C")]
    stats = answer_stats.answer_stats(records)
    assert stats == {"em": 0.5, "distinct_answers": 3, "top_answer": "A", "top_given": 4, "top_is_gold": 2,
                     "top_right": 2.0, "top3_share": 1.0, "gold_of_some_episode": 5 / 6, "constant_guess_em": 0.5}
    report = tmp_path / "r.json"
    _report(report, records)
    result = _tool("answer_stats.py", str(report))
    assert result.returncode == 0 and "6 episodes, EM 0.500, 3 distinct answers; most common 'A' given 4x" in result.stdout


def test_answer_stats_rejects_a_file_that_is_not_a_report(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"policies": []}')
    result = _tool("answer_stats.py", str(bad), str(tmp_path / "missing.json"))
    assert result.returncode != 0 and "is not an eval.py JSON report" in result.stderr


def test_answer_sources_sorts_answers_by_the_fact_they_come_from(tmp_path):
    import gymnasium as gym

    import atommem_env  # noqa: F401  (registers the ids)

    args = {"env_id": "AtomMem/Synthetic-v0", "split": "eval", "chunk_tokens": 256,
            "env_kwargs": '{"synthetic": {"hops": [2, 2], "distractors": 2, "volatility": 0}}'}
    env = gym.make(args["env_id"], split="eval", embedder="hashing", context_tokens=800, chunk_tokens=256,
                   synthetic={"hops": [2, 2], "distractors": 2, "volatility": 0})
    tasks = [env.unwrapped.task_source.get(i) for i in range(5)]
    env.close()
    gold = [t.questions[0].answers[0] for t in tasks]
    # task 2 asks where the head of state of a country lives: "... of <country> is <bridge>.", "<bridge> lives in <gold>."
    bridge = tasks[2].questions[0].supporting_facts[1].text.rstrip(".").split(" is ")[-1]
    # task 3's look-alike: "<person one letter off> works for <company>."
    look_alike_object = dict(tasks[3].metadata)["look_alike_facts"][0].rstrip(".").split(" works for ")[-1]
    assert bridge == "Brevfeart Grithgryr" and look_alike_object == "Brudraiv Labs"
    answers = [gold[0], "", bridge, look_alike_object, "Nobody Anywhere"]
    reads = [2, 4, 1, 2, 2]
    records = [{"task_index": i, "em": float(i == 0), "answer": [a] if a else [], "gold": [[g]],
                "ops": {"read": n, "answer": int(bool(a))}} for i, (a, g, n) in enumerate(zip(answers, gold, reads))]
    report = tmp_path / "r.json"
    report.write_text(json.dumps({"args": args, "results": {"llm": {"800": {"records": records}}}}))
    result = _tool("answer_sources.py", str(report))
    assert result.returncode == 0, result.stderr
    assert "llm 800: 5 episodes: right 1, none 1, earlier hop 1, look-alike 1, other 1" in result.stdout
    assert "llm 800: by Reads (episodes, right): 1 Reads: 1 (0); 2 Reads: 3 (1); 4 Reads, no answer: 1 (0)" \
        in result.stdout


def test_answer_sources_rejects_reports_it_cannot_read(tmp_path):
    not_a_report, real_data = tmp_path / "bad.json", tmp_path / "hotpot.json"
    not_a_report.write_text('{"policies": []}')
    real_data.write_text(json.dumps({"args": {"env_id": "AtomMem/HotpotQA-v0", "split": "eval"},
                                     "results": {"llm": {"400": {"records": [{"task_index": 0}]}}}}))
    for path, message in ((not_a_report, "is not an eval.py JSON report"), (real_data, "need a synthetic env id")):
        result = _tool("answer_sources.py", str(path))
        assert result.returncode != 0 and message in result.stderr, result.stderr


def _length_report(path, em_by_cell, policies=("llm",)):
    cells = {cell: {"em": em, "em_stderr": 0.01, "episodes": 64, "records": []} for cell, em in em_by_cell.items()}
    path.write_text(json.dumps({"args": {"model": path.stem}, "results": {policy: cells for policy in policies}}))
    return str(path)


def test_plot_em_vs_length_joins_reports_with_the_same_label(tmp_path):
    short = _length_report(tmp_path / "a.json", {"800": 0.75, "4000": 0.8})
    long = _length_report(tmp_path / "b.json", {"16000": 0.9})
    grown = _length_report(tmp_path / "c.json", {"4000": 0.6}, policies=("llm", "rag"))
    out = tmp_path / "fig.png"
    result = _tool("plot_em_vs_length.py", "--reports", short, long, grown, "--labels", "fixed", "fixed", "grown",
                    "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert "fixed: 800 0.750 ± 0.010, 4000 0.800 ± 0.010, 16000 0.900 ± 0.010" in result.stdout
    assert "grown: llm: 4000 0.600 ± 0.010" in result.stdout and "grown: rag: 4000 0.600 ± 0.010" in result.stdout
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_em_vs_length_refuses_a_length_twice_a_bad_report_and_mismatched_labels(tmp_path):
    first = _length_report(tmp_path / "a.json", {"800": 0.75})
    again = _length_report(tmp_path / "b.json", {"800": 0.5})
    out = tmp_path / "fig.png"
    result = _tool("plot_em_vs_length.py", "--reports", first, again, "--labels", "x", "x", "--out", str(out))
    assert result.returncode != 0 and "'x' already has a point at ['800']" in result.stderr
    (tmp_path / "bad.json").write_text('{"results": [1]}')
    result = _tool("plot_em_vs_length.py", "--reports", str(tmp_path / "bad.json"), "--out", str(out))
    assert result.returncode != 0 and "bad.json is not an eval.py JSON report" in result.stderr
    result = _tool("plot_em_vs_length.py", "--reports", str(tmp_path / "missing.json"), "--out", str(out))
    assert result.returncode != 0 and "missing.json is not an eval.py JSON report" in result.stderr
    result = _tool("plot_em_vs_length.py", "--reports", first, "--labels", "x", "y", "--out", str(out))
    assert result.returncode != 0 and "one --labels entry per report" in result.stderr
    assert not out.exists()


def test_join_reports_keys_every_policy_and_length_with_the_report_it_came_from(tmp_path):
    short = _length_report(tmp_path / "short.json", {"800": 0.75, "4000": 0.8})
    long = _length_report(tmp_path / "long.json", {"16000": 0.9})
    rag = _length_report(tmp_path / "rag.json", {"800": 0.1, "16000": 0.05}, policies=("rag",))
    out = tmp_path / "joined.json"
    result = _tool("join_reports.py", "--reports", short, long, rag, "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert "llm: 800 0.750 ± 0.010 (64 episodes), 4000 0.800 ± 0.010 (64 episodes), 16000 0.900" in result.stdout
    joined = json.loads(out.read_text())
    assert joined["joined_from"] == {short: {"model": "short"}, long: {"model": "long"}, rag: {"model": "rag"}}
    assert {policy: {cell: s["source"] for cell, s in cells.items()} for policy, cells in joined["results"].items()} \
        == {"llm": {"800": short, "4000": short, "16000": long}, "rag": {"800": rag, "16000": rag}}
    assert joined["results"]["llm"]["800"]["em"] == 0.75 and "records" not in joined["results"]["llm"]["800"]
    figure = tmp_path / "fig.png"  # the joined report plots like any other
    result = _tool("plot_em_vs_length.py", "--reports", str(out), "--out", str(figure))
    assert result.returncode == 0 and "joined: rag: 800 0.100 ± 0.010, 16000 0.050 ± 0.010" in result.stdout


def test_join_reports_refuses_a_cell_twice_a_joined_source_and_what_is_not_a_report(tmp_path):
    first = _length_report(tmp_path / "a.json", {"800": 0.75})
    again = _length_report(tmp_path / "b.json", {"800": 0.5, "4000": 0.4})
    out = tmp_path / "joined.json"
    result = _tool("join_reports.py", "--reports", first, again, "--out", str(out))
    assert result.returncode != 0 and f"b.json: llm at ['800'] is already in {first}" in result.stderr
    assert not out.exists()
    assert _tool("join_reports.py", "--reports", first, "--out", str(out)).returncode == 0
    result = _tool("join_reports.py", "--reports", str(out), "--out", str(tmp_path / "again.json"))
    assert result.returncode != 0 and "joined.json has no args" in result.stderr
    (tmp_path / "bad.json").write_text('{"args": {}, "results": {"llm": {"800": {"f1": 1}}}}')
    for bad in ("bad.json", "missing.json"):
        result = _tool("join_reports.py", "--reports", str(tmp_path / bad), "--out", str(tmp_path / "x.json"))
        assert result.returncode != 0 and f"{bad} is not an eval.py JSON report" in result.stderr


def test_read_rank_finds_every_hop_in_the_top_six_with_two_look_alikes_and_refuses_bad_flags():
    flags = ["--context-tokens", "800", "--num-tasks", "8", "--top-ks", "1", "6", "--env-kwargs",
             '{"synthetic": {"hops": [2, 2], "distractors": 2, "volatility": 0}}']
    result = _tool("read_rank.py", *flags)
    assert result.returncode == 0, result.stderr
    assert "train split, 800 tokens, 8 tasks, 2.0 look-alike sentences a task" in result.stdout
    rows = {line.split()[0]: line.split()[1:] for line in result.stdout.splitlines()[2:]}
    assert set(rows) == {"1", "2", "all"}
    assert rows["all"][-1] == "1.000" and float(rows["all"][0]) < 1  # the hop-1 fact names the next subject too
    for bad, message in ((["--env-kwargs", "{not json"], "--env-kwargs must be a JSON object"),
                         (["--env-kwargs", "[1]"], "--env-kwargs must be a JSON object, got list"),
                         (["--env-id", "AtomMem/HotpotQA-v0"], "is not a synthetic env id"),
                         (["--top-ks", "0"], "must be positive"),
                         (["--env-kwargs", '{"synthetic": {"hops": [0, 0]}}'], "cannot be built with these arguments")):
        result = _tool("read_rank.py", "--num-tasks", "2", *bad)
        assert result.returncode != 0 and message in result.stderr


def test_update_steps_sorts_what_a_policy_did_with_each_superseded_fact(tmp_path):
    import gymnasium as gym

    import atommem_env  # noqa: F401  (registers the ids)

    synthetic = {"hops": [2, 2], "distractors": 2, "volatility": 1.0}
    args = {"env_id": "AtomMem/Synthetic-v0", "split": "train", "chunk_tokens": 256,
            "env_kwargs": json.dumps({"synthetic": synthetic})}
    env = gym.make(args["env_id"], split="train", embedder="hashing", context_tokens=800, chunk_tokens=256,
                   synthetic=synthetic)
    pairs = {}
    for i in range(32):
        facts = [f for q in env.unwrapped.task_source.get(i).questions for f in q.supporting_facts]
        stale = [f for f in facts if not f.current]
        if len(stale) == 1:
            pairs[i] = (stale[0].text, next(f.text for f in facts if f.key == stale[0].key and f.current))
    env.close()
    (a, b, c, d) = list(pairs)[:4]

    def step(task, shown, ops, em):
        prompt = "Question: ...\n\nRetrieved:\n" + "\n".join(f"[id {n}] {text}" for n, text in shown)
        return {"episode_id": f"llm/800/{task}", "task_index": task, "step": 0, "messages": [{"content": prompt}],
                "ops": ops, "em": em, "reward": em, "prompt_token_ids": [], "completion_token_ids": [],
                "policy": "llm", "cell": "800"}
    lines = [
        step(a, [(5, "Somebody works for Someone Labs."), (3, pairs[a][0])],
             [{"op": "update", "entry_id": 3, "text": pairs[a][1].upper()}], 1.0),
        step(b, [], [{"op": "create", "text": pairs[b][1]}], 0.0),
        step(c, [(2, "A quiet bridge was visited last spring.")],
             [{"op": "update", "entry_id": 7, "text": pairs[c][1]}, {"op": "update", "entry_id": 2, "text": "x"}], 0.0),
        step(d, [(3, pairs[d][0])], [{"op": "update", "entry_id": 3, "text": "Somebody lives somewhere."}], 0.0),
    ]
    trajectories = tmp_path / "t.jsonl"
    trajectories.write_text("".join(json.dumps(line) + "\n" for line in lines))
    report = tmp_path / "r.json"
    report.write_text(json.dumps({"args": args, "results": {"llm": {"800": {"em": 0.25, "em_stderr": 0.2,
                                                                           "episodes": 4}}}}))
    result = _tool("update_steps.py", "--report", str(report), "--trajectories", str(trajectories))
    assert result.returncode == 0, result.stderr
    assert ("llm 800: 4 episodes; superseded facts: updated 1 (1 right); created beside 1 (0 right); missed 2 "
            "(0 right); Updates: stale -> new 1, stale -> other 1, other entry 1, id not shown 1 (2 of the first entry "
            "shown)") in result.stdout

    joined = tmp_path / "joined.json"
    joined.write_text(json.dumps({"results": json.loads(report.read_text())["results"]}))
    for flags, message in ((["--trajectories", str(tmp_path / "missing.jsonl")], "missing.jsonl"),
                           (["--report", str(trajectories)], "is not an eval.py JSON report"),
                           (["--report", str(joined)], "joined.json has no args")):
        given = {"--report": str(report), "--trajectories": str(trajectories)} | dict([flags])
        result = _tool("update_steps.py", *[x for pair in given.items() for x in pair])
        assert result.returncode != 0 and message in result.stderr


def _task_report(path, ems, policies=("llm",), cell="2000"):
    records = [{"task_id": task, "em": em} for task, em in ems.items()]
    summary = {"em": sum(ems.values()) / len(ems), "em_stderr": 0.1, "episodes": len(ems), "records": records}
    path.write_text(json.dumps({"args": {"model": path.stem}, "results": {p: {cell: summary} for p in policies}}))
    return str(path)


def test_paired_differences_match_tasks_by_id_and_refuse_what_cannot_be_paired(tmp_path):
    before = _task_report(tmp_path / "before.json", {"a": 1, "b": 0, "c": 0, "d": 1, "e": 1})
    after = _task_report(tmp_path / "after.json", {"f": 0, "e": 1, "d": 1, "c": 1, "b": 1})  # other order, a missing
    out = tmp_path / "paired.json"
    result = _tool("paired.py", "--before", before, "--after", after, "--out", str(out))
    assert result.returncode == 0, result.stderr
    # Shared b-e: differences 1, 1, 0, 0: mean 0.5, standard error sqrt(1 / 3 / 4).
    assert "2000: 4 tasks, EM 0.500 -> 1.000, paired +0.500 ± 0.289 (2 gained, 0 lost)" in result.stdout
    assert json.loads(out.read_text())["cells"]["2000"]["gained"] == 2
    two = _task_report(tmp_path / "two.json", {"a": 1}, policies=("llm", "rag"))
    twice = tmp_path / "twice.json"
    twice.write_text(json.dumps({"args": {}, "results": {"llm": {"2000": {
        "em": 1, "em_stderr": 0, "episodes": 2, "records": [{"task_id": "a", "em": 1}, {"task_id": "a", "em": 0}]}}}}))
    other = _task_report(tmp_path / "other.json", {"z": 1})
    elsewhere = _task_report(tmp_path / "elsewhere.json", {"a": 1}, cell="800")
    for flags, message in (([before, two], "give one policy per report"), ([before, str(twice)], "task a ran twice"),
                           ([before, other], "the reports share no task"), ([before, elsewhere], "no length cell in both"),
                           ([before, str(tmp_path / "missing.json")], "is not an eval.py JSON report")):
        result = _tool("paired.py", "--before", flags[0], "--after", flags[1])
        assert result.returncode != 0 and message in result.stderr, (message, result.stderr)


def test_teacher_forced_counts_the_students_step_kinds_on_the_teachers_states(tmp_path):
    _spec = importlib.util.spec_from_file_location("teacher_forced", REPO / "study" / "teacher_forced.py")
    teacher_forced = importlib.util.module_from_spec(_spec)
    sys.modules["teacher_forced"] = teacher_forced  # its dataclass looks its module up there
    _spec.loader.exec_module(teacher_forced)
    assert [teacher_forced.step_kind(a, "atommem") for a in
            ("<read>q</read>", "", "thinking aloud", '<update id="3">x', '<create>a</create><read>b</read>')] == \
        ["read", "none", "none", "invalid", "create"]
    assert teacher_forced.agreement([("read", "read"), ("update", "none"), ("update", "update")]) == {
        "read": {"steps": 1, "same": 1, "student": {"read": 1}},
        "update": {"steps": 2, "same": 1, "student": {"none": 1, "update": 1}}}

    out = tmp_path / "forced.json"
    result = _tool("teacher_forced.py", "--checkpoint", "tiny", "--num-tasks", "1", "--num-envs", "1",
                   "--max-new-tokens", "8", "--out", str(out))
    assert result.returncode == 0, result.stderr
    table = json.loads(out.read_text())["by_teacher_kind"]
    assert {"read", "create", "answer"} <= set(table)  # oracle-scan: a Read at every chunk, a first write, an answer
    assert all(sum(row["student"].values()) == row["steps"] >= row["same"] for row in table.values())
    assert "on oracle-scan's states, train tasks 0-0 of AtomMem/SyntheticVolatileBudget-v0" in result.stdout
    for bad, message in ((["--teacher", "nobody"], "--teacher nobody: unknown policy"),
                         (["--num-tasks", "0"], "sizes and counts must be positive"),
                         (["--env-id", "AtomMem/Nothing-v0"], "unknown env id 'AtomMem/Nothing-v0'"),
                         (["--env-kwargs", "{not json"], "--env-kwargs must be a JSON object"),
                         (["--checkpoint", "runs/no_such_run/checkpoint"], "model path not found")):
        flags = ["--checkpoint", "tiny", *bad] if bad[0] != "--checkpoint" else bad
        result = _tool("teacher_forced.py", *flags)
        assert result.returncode != 0 and message in result.stderr, (bad, result.stderr)
