import hashlib
import json
import re
import warnings

import numpy as np
import pytest

from atommem_env import AtomMemEnv
from atommem_env.chunking import Chunker
from atommem_env.data import (ComposedTaskSource, DataFormatError, LoadStats, SyntheticTaskSource, generate_task,
                              load_items, make_task_source, select_split, split_of)
from atommem_env.data.synthetic import statement_subject
from atommem_env.tokens import RegexTokenCounter

from conftest import FIXTURES, HOTPOT_OFFICIAL

COUNTER = RegexTokenCounter()


def doc_tokens(task):
    return Chunker(task.paragraphs, COUNTER, 10**9).total_tokens


def test_both_hotpot_layouts_load_the_same_questions(hotpot_path):
    hf = load_items("hotpotqa", hotpot_path)
    official = load_items("hotpotqa", HOTPOT_OFFICIAL)
    assert len(hf) == 100 and len(official) == 53
    for a, b in zip(hf, official):
        assert a.question.question == b.question.question and a.question.answers == b.question.answers
        assert a.paragraphs == b.paragraphs and a.gold_titles == b.gold_titles
        assert [f.text for f in a.question.supporting_facts] == [f.text for f in b.question.supporting_facts]
    first = official[0]
    assert first.question.question_id == "5a8b57f25542995d1e6f1371"
    assert first.question.supporting_facts[0].text.startswith("Scott Derrickson (born July 16, 1966)")


def test_2wiki_and_musique_fixtures():
    wiki = load_items("2wiki", FIXTURES / "2wiki_dev_sample.json")
    assert [i.question.answers for i in wiki] == [("Maria Claes",), ("Harbour Lights",), ("Nils Borg",)]
    assert wiki[0].question.supporting_facts[1].text == "He was the son of Maria Claes and Jan Vandamme."
    musique = load_items("musique", FIXTURES / "musique_ans_dev_sample.jsonl")
    assert musique[0].question.answers == ("Korvath", "Korvath City")  # aliases kept
    assert musique[0].gold_titles == {"Varda (river)", "Northern Tessaly"}
    assert [f.sentence_index for f in musique[0].question.supporting_facts] == [-1, -1]


def _write(tmp_path, name, payload):
    path = tmp_path / name
    path.write_text(payload if isinstance(payload, str) else json.dumps(payload))
    return path


def test_errors_name_file_record_and_field(tmp_path, hotpot_path):
    records = json.loads(hotpot_path.read_text())[:3]
    broken = [dict(r) for r in records]
    del broken[1]["answer"]
    path = _write(tmp_path, "broken.json", broken)
    with pytest.raises(DataFormatError, match=r"broken\.json, record 1, field 'answer': missing"):
        load_items("hotpotqa", path)
    broken[1]["answer"] = 3
    with pytest.raises(DataFormatError, match=r"record 1, field 'answer': expected str, got int"):
        load_items("hotpotqa", _write(tmp_path, "b2.json", broken))
    broken[1]["answer"] = "x"
    broken[2]["supporting_facts"] = {"title": ["Nowhere"], "sent_id": [0]}
    with pytest.raises(DataFormatError, match=r"record 2, field 'supporting_facts': title 'Nowhere'"):
        load_items("hotpotqa", _write(tmp_path, "b3.json", broken))
    with pytest.raises(DataFormatError, match="expected a JSON list"):
        load_items("hotpotqa", _write(tmp_path, "obj.json", {"data": records}))
    with pytest.raises(DataFormatError, match="not JSON"):
        load_items("hotpotqa", _write(tmp_path, "trunc.json", "[{"))
    with pytest.raises(DataFormatError, match=r"wrong_layout\.jsonl, line 1, field 'paragraphs': missing"):
        load_items("musique", _write(tmp_path, "wrong_layout.jsonl", json.dumps(records[0]) + "\n"))
    with pytest.raises(ValueError, match="not found"):
        load_items("hotpotqa", tmp_path / "absent.json")


def test_skip_malformed_counts_what_it_skips(tmp_path, hotpot_path):
    records = json.loads(hotpot_path.read_text())[:4]
    del records[2]["question"]
    stats = LoadStats()
    items = load_items("hotpotqa", _write(tmp_path, "x.json", records), skip_malformed=True, stats=stats)
    assert len(items) == 3 and stats.loaded == 3 and stats.skipped == 1 and "record 2" in stats.errors[0]
    lines = (FIXTURES / "musique_ans_dev_sample.jsonl").read_text().splitlines()
    path = _write(tmp_path, "m.jsonl", "\n".join([lines[0], "{not json", lines[1]]))
    with pytest.raises(DataFormatError, match=r"m\.jsonl, line 2: not JSON"):
        load_items("musique", path)
    stats = LoadStats()
    assert len(load_items("musique", path, skip_malformed=True, stats=stats)) == 2 and stats.skipped == 1


def test_splits_are_disjoint_and_stable(hotpot_path):
    items = load_items("hotpotqa", hotpot_path)
    train, evaluation = select_split(items, "train"), select_split(items, "eval")
    assert len(train) + len(evaluation) == 100 and 5 <= len(evaluation) <= 40
    assert not {i.question.question for i in train} & {i.question.question for i in evaluation}
    assert split_of(items[0].question.question) == split_of(items[0].question.question)
    # Padding for one split only draws from that split's paragraphs.
    source = ComposedTaskSource(evaluation, COUNTER, context_tokens=8000)
    train_only = {p.title for i in train for p in i.paragraphs} - {p.title for i in evaluation for p in i.paragraphs}
    for index in range(source.num_tasks):
        assert not {p.title for p in source.get(index).paragraphs} & train_only


@pytest.mark.parametrize("target", [7_000, 32_000])
def test_long_context_reaches_target_and_is_deterministic(hotpot_path, target):
    items = load_items("hotpotqa", hotpot_path)
    source = ComposedTaskSource(items, COUNTER, context_tokens=target, seed=5)
    task = source.get(3)
    assert target <= doc_tokens(task) <= target + 1_000
    assert source.get(3) == task and ComposedTaskSource(items, COUNTER, context_tokens=target, seed=5).get(3) == task
    titles = [p.title for p in task.paragraphs]
    assert items[3].gold_titles <= set(titles)
    assert len([t for t in titles if t in items[3].gold_titles]) == len(items[3].gold_titles)  # gold not repeated
    other_seed = ComposedTaskSource(items, COUNTER, context_tokens=target, seed=6).get(3)
    gold_positions = lambda t: sorted(i for i, p in enumerate(t.paragraphs) if p.title in items[3].gold_titles)  # noqa
    assert gold_positions(task) != gold_positions(other_seed)


def test_small_pool_repeats_are_counted_and_reported(hotpot_path):
    items = load_items("hotpotqa", hotpot_path)[:5]
    source = ComposedTaskSource(items, COUNTER, context_tokens=20_000)
    with pytest.warns(UserWarning, match=r"pool of 50 distinct paragraphs is too small for context_tokens=20000"):
        task = source.get(0)
    assert doc_tokens(task) >= 20_000 and task.meta["repeated_paragraphs"] > 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per source, not once per task
        source.get(1)
    env = AtomMemEnv(dataset=source, embedder="hashing")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert env.reset(options={"task_index": 2})[1]["repeated_paragraphs"] > 0


def test_multi_query_groups_follow_the_paper(hotpot_path):
    items = load_items("hotpotqa", hotpot_path)
    source = ComposedTaskSource(items, COUNTER, multi_query=True, num_documents=60)
    sizes = []
    for index in range(60):
        task = source.get(index)
        sizes.append(len(task.questions))
        assert [q.question for q in task.questions] == [i.question.question for i in items[index:index + len(task.questions)]]
        gold = {t for i in items[index:index + len(task.questions)] for t in i.gold_titles}
        assert gold <= {p.title for p in task.paragraphs} and len(task.paragraphs) == max(60, len(gold))
    assert 0.3 < np.mean(np.array(sizes) == 1) < 0.7 and max(sizes) <= 10 and max(sizes) >= 4


def test_make_task_source_validates():
    with pytest.raises(ValueError, match="both"):
        ComposedTaskSource([], COUNTER, context_tokens=10, num_documents=3)
    with pytest.raises(ValueError, match="takes no data_path"):
        make_task_source("synthetic", data_path="x.json")
    with pytest.raises(ValueError, match="split"):
        make_task_source("synthetic", split="test")
    with pytest.raises(ValueError, match="volatility"):
        make_task_source("synthetic", synthetic={"volatility": 2})


def test_synthetic_is_deterministic_and_answers_are_in_the_document():
    for seed in range(20):
        task = generate_task(seed, context_tokens=1500, volatility=0.5, distractors=4, hops=(2, 4))
        assert task == generate_task(seed, context_tokens=1500, volatility=0.5, distractors=4, hops=(2, 4))
        text = "\n".join(p.text for p in task.paragraphs)
        question = task.questions[0]
        assert question.answers[0] in text
        by_title = {p.title: p.text for p in task.paragraphs}
        for fact in question.supporting_facts:
            assert fact.text in by_title[fact.title]
        assert 1500 <= doc_tokens(task) <= 1500 + 200
    assert generate_task(1) != generate_task(2)


def test_synthetic_tasks_list_their_look_alike_distractors():
    for seed in range(10):
        task = generate_task(seed, context_tokens=600, distractors=3, hops=(1, 2), volatility=0.0)
        look_alikes = task.meta["look_alike_facts"]
        text = "\n".join(p.text for p in task.paragraphs)
        supporting = {f.text for f in task.questions[0].supporting_facts}
        assert len(look_alikes) == 3 and all(s in text for s in look_alikes) and not supporting & set(look_alikes)
        words = {w for f in supporting for w in f.split()}
        for look_alike in look_alikes:  # its entity is one letter away from one the question chain names
            assert any(len(a) == len(b) and sum(x != y for x, y in zip(a, b)) == 1
                       for a in look_alike.split() for b in words)
    assert generate_task(0, distractors=0).meta["look_alike_facts"] == ()


def test_statement_subject_names_the_entity_of_every_fact_sentence_and_nothing_else():
    for seed in range(20):
        task = generate_task(seed, context_tokens=600, distractors=3, hops=(1, 3), volatility=1.0)
        for fact in task.questions[0].supporting_facts:
            assert statement_subject(fact.text) == fact.key.split("|")[0]
        supporting_subjects = {f.key.split("|")[0] for f in task.questions[0].supporting_facts}
        for look_alike in task.meta["look_alike_facts"]:
            subject = statement_subject(look_alike)
            assert subject and subject in look_alike
            assert subject not in supporting_subjects
    assert statement_subject("The quiet bridge near the valley was repaired during the spring.") is None
    assert statement_subject("") is None


def test_synthetic_look_alikes_do_not_run_out_in_long_look_alike_settings():
    """160 look-alikes (2.5 per 1k tokens at 64k) need ~80 variants of one name: more than one letter gives."""
    for seed in (3, 4, 60, 153):  # seeds whose one-letter variants ran out ("could not draw a look-alike name")
        task = generate_task(seed, hops=(2, 2), distractors=160, volatility=0.0, context_tokens=1)
        look_alikes = task.meta["look_alike_facts"]
        assert len(look_alikes) == 160 and len(set(look_alikes)) == 160
        chain = {w for f in task.questions[0].supporting_facts for w in f.text.rstrip(".").split()}
        for look_alike in look_alikes:  # one or two letters away from a word of the question's chain
            assert any(len(a) == len(b) and 1 <= sum(x != y for x, y in zip(a, b)) <= 2
                       for a in look_alike.rstrip(".").split() for b in chain)
    # Tasks that built before keep every draw: their look-alikes are the same sentences.
    digest = hashlib.sha256("\n".join(generate_task(0, hops=(2, 2), distractors=80, volatility=0.0,
                                                     context_tokens=1).meta["look_alike_facts"]).encode())
    assert digest.hexdigest()[:16] == "bb0c2a1f5e43c742"


def test_synthetic_volatile_facts_are_superseded_later():
    changed = 0
    for seed in range(30):
        task = generate_task(seed, context_tokens=800, volatility=1.0, hops=(3, 3))
        facts = task.questions[0].supporting_facts  # in document order
        order = {(f.title, f.sentence_index): i for i, f in enumerate(facts)}
        for stale in (f for f in facts if not f.current):
            newer = [f for f in facts if f.key == stale.key and f.current]
            assert len(newer) == 1 and order[(newer[0].title, newer[0].sentence_index)] > order[(stale.title, stale.sentence_index)]
            changed += 1
        renames = [f for f in facts if f.key.endswith("|name")]
        for rename in renames:
            assert rename.text.endswith(f"renamed {task.questions[0].answers[0]}.")
    assert changed > 10


def test_synthetic_difficulty_knobs_and_splits():
    hops = [len(generate_task(s, hops=(4, 4), volatility=0.0).questions[0].supporting_facts) for s in range(10)]
    assert hops == [4] * 10
    multi = generate_task(0, questions=3)
    assert len(multi.questions) == 3 and len({q.answers for q in multi.questions}) == 3
    train, evaluation = SyntheticTaskSource("train", num_tasks=50), SyntheticTaskSource("eval", num_tasks=50)
    assert not {train.task_seed(i) for i in range(50)} & {evaluation.task_seed(i) for i in range(50)}
    assert SyntheticTaskSource("eval", seed=3).task_seed(0) % 2 == 1
    with pytest.raises(IndexError):
        train.get(50)


def test_synthetic_name_pool_closes_the_answer_set():
    from atommem_env.data.synthetic import _name_pools

    pool = {name for names in _name_pools(16).values() for name in names}
    answers = set()
    for seed in range(40):
        task = generate_task(seed, hops=(1, 2), distractors=3, volatility=0.0, context_tokens=300, name_pool=16)
        assert task == generate_task(seed, hops=(1, 2), distractors=3, volatility=0.0, context_tokens=300,
                                     name_pool=16)
        answer = task.questions[0].answers[0]
        assert answer in pool and answer in "\n".join(p.text for p in task.paragraphs)
        answers.add(answer)
    assert len(answers) > 10  # the document, not the pool, decides the answer
    assert generate_task(0, name_pool=None).questions[0].answers[0] not in pool
    with pytest.raises(ValueError, match="name_pool"):
        generate_task(0, name_pool=4)
    with pytest.raises(ValueError, match="too small"):  # 8 cities cannot serve 30 distractor facts
        generate_task(0, hops=(1, 1), distractors=30, name_pool=8)


def test_one_million_token_episode_streams_lazily():
    task = generate_task(0, context_tokens=1_000_000)
    chunker = Chunker(task.paragraphs, COUNTER, 4096)
    assert chunker.total_tokens >= 1_000_000 and len(chunker) >= 245
    assert all(chunker.chunk_token_count(i) <= 4096 for i in range(len(chunker)))
    assert COUNTER.count(chunker.chunk(len(chunker) // 2)) == chunker.chunk_token_count(len(chunker) // 2)


# Loader defects found with real dev files (issue 13, part 2).
def test_2wiki_sentences_are_joined_with_a_space():
    wiki = load_items("2wiki", FIXTURES / "2wiki_dev_sample.json")
    texts = [p.text for item in wiki for p in item.paragraphs]
    assert "Belgian drama film. It was directed" in texts[0]
    assert not any(re.search(r"[a-z]\.[A-Z]", t) for t in texts)  # no glued sentence boundary
    raw = json.loads(HOTPOT_OFFICIAL.read_text())  # HotpotQA sentences carry their leading space: text unchanged
    for item, record in zip(load_items("hotpotqa", HOTPOT_OFFICIAL), raw):
        for paragraph, (_, sentences) in zip(item.paragraphs, record["context"]):
            if all(s[:1].isspace() for s in sentences[1:]):
                assert paragraph.text == "".join(sentences).strip()


def test_musique_full_files_leave_unanswerable_rows_out_and_count_them(tmp_path):
    rows = [json.loads(line) for line in (FIXTURES / "musique_ans_dev_sample.jsonl").read_text().splitlines()]
    rows[0]["answerable"], rows[1]["answerable"] = False, True
    path = _write(tmp_path, "musique_full_dev.jsonl", "\n".join(json.dumps(r) for r in rows))
    stats = LoadStats()
    items = load_items("musique", path, stats=stats)
    assert len(items) == len(rows) - 1 and stats.unanswerable == 1
    with pytest.warns(UserWarning, match="1 unanswerable ones left out"):
        source = make_task_source("musique", data_path=str(path))
    env = AtomMemEnv(dataset=source, embedder="hashing")
    assert env.reset(seed=0)[1]["unanswerable_left_out"] == 1
    rows[1]["answerable"] = "yes"
    with pytest.raises(DataFormatError, match=r"line 2, field 'answerable': expected true or false"):
        load_items("musique", _write(tmp_path, "bad.jsonl", "\n".join(json.dumps(r) for r in rows)))


def test_null_records_are_errors_or_counted_skips(tmp_path, hotpot_path):
    records = json.loads(hotpot_path.read_text())[:3]
    path = _write(tmp_path, "nulls.json", [records[0], None, records[1]])
    with pytest.raises(DataFormatError, match=r"nulls\.json, record 1: the record is null"):
        load_items("hotpotqa", path)
    stats = LoadStats()
    assert len(load_items("hotpotqa", path, skip_malformed=True, stats=stats)) == 2 and stats.skipped == 1
    line = (FIXTURES / "musique_ans_dev_sample.jsonl").read_text().splitlines()[0]
    with pytest.raises(DataFormatError, match=r"n\.jsonl, line 2: the record is null"):
        load_items("musique", _write(tmp_path, "n.jsonl", f"{line}\nnull\n"))


@pytest.mark.parametrize("aliases, problem", [("Paris", "'Paris'"), (5, "5"), ([1, 2], r"\[1, 2\]")])
def test_answer_aliases_must_be_a_list_of_strings(tmp_path, hotpot_path, aliases, problem):
    record = json.loads(hotpot_path.read_text())[0]
    record["answer_aliases"] = aliases
    with pytest.raises(DataFormatError, match=rf"record 0, field 'answer_aliases': expected a list of strings, got {problem}"):
        load_items("hotpotqa", _write(tmp_path, "aliases.json", [record]))
    record["answer_aliases"] = ["Paris"]
    assert load_items("hotpotqa", _write(tmp_path, "ok.json", [record]))[0].question.answers[1:] == ("Paris",)


def test_a_file_that_is_not_utf8_is_named(tmp_path):
    path = tmp_path / "latin1.json"
    path.write_bytes('[{"question": "Qui a créé X?"}]'.encode("latin-1"))
    with pytest.raises(DataFormatError, match=r"latin1\.json: not UTF-8 text \(byte 0xe9 at offset 23\)"):
        load_items("hotpotqa", path)


def test_a_truncated_json_list_names_the_record(tmp_path, hotpot_path):
    text = json.dumps(json.loads(hotpot_path.read_text())[:3])
    with pytest.raises(DataFormatError, match=r"trunc\.json: not JSON: .*\(record 2, line 1, column \d+") as caught:
        load_items("hotpotqa", _write(tmp_path, "trunc.json", text[:int(len(text) * 0.9)]))
    assert "at at" not in str(caught.value) and "a truncated download?" in str(caught.value)


def test_musique_paragraph_errors_name_the_paragraph(tmp_path):
    row = json.loads((FIXTURES / "musique_ans_dev_sample.jsonl").read_text().splitlines()[0])
    del row["paragraphs"][1]["paragraph_text"]
    with pytest.raises(DataFormatError, match=r"line 1, field 'paragraphs\[1\]\.paragraph_text': missing"):
        load_items("musique", _write(tmp_path, "p.jsonl", json.dumps(row)))
    row["paragraphs"][1] = None
    with pytest.raises(DataFormatError, match=r"field 'paragraphs\[1\]': expected a JSON object, got null"):
        load_items("musique", _write(tmp_path, "p2.jsonl", json.dumps(row)))


def test_jsonl_errors_name_the_line_after_blank_lines(tmp_path):
    lines = (FIXTURES / "musique_ans_dev_sample.jsonl").read_text().splitlines()
    broken = json.loads(lines[1])
    del broken["question"]
    path = _write(tmp_path, "gaps.jsonl", "\n".join([lines[0], "", "", json.dumps(broken)]))
    with pytest.raises(DataFormatError, match=r"gaps\.jsonl, line 4, field 'question': missing"):
        load_items("musique", path)


def test_skipped_records_are_shown_in_a_warning_and_the_reset_info(tmp_path, hotpot_path):
    records = json.loads(hotpot_path.read_text())[:6]
    del records[2]["question"]
    path = _write(tmp_path, "x.json", records)
    with pytest.warns(UserWarning, match=r"5 records loaded, 1 malformed ones skipped.*record 2, field 'question'"):
        source = make_task_source("hotpotqa", data_path=str(path), skip_malformed=True)
    info = AtomMemEnv(dataset=source, embedder="hashing").reset(seed=0)[1]
    assert info["records_loaded"] == 5 and info["records_skipped"] == 1
