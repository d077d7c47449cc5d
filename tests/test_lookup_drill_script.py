"""scripts/lookup_drill.py: its drills ask what their context states, and it scores the answer token."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import mlx.core as mx
import numpy as np

from conftest import REPO

sys.path.insert(0, str(REPO / "scripts"))  # lookup_drill imports stories as the scripts do
spec = importlib.util.spec_from_file_location("lookup_drill", REPO / "scripts" / "lookup_drill.py")
drill = importlib.util.module_from_spec(spec)
spec.loader.exec_module(drill)


def test_a_synthetic_drill_asks_for_the_one_feeling_its_context_states():
    vocab = drill.synthetic_vocab()
    words = {i: w for w, i in vocab.items()}
    rng = np.random.default_rng(0)
    for short, (low, high) in ((True, (10, 27)), (False, (40, 88))):
        for _ in range(50):
            ids = drill.synthetic_drills(short, rng, vocab)
            text = [words[i] for i in ids]
            assert low <= len(ids) <= high and text[0] == "<s>" and text[-1] == "</s>"
            stated = [text[i + 1] for i, w in enumerate(text[:-7]) if w == "felt"]
            name, answer = text[-5], text[-2]
            assert text[-7:-2] == ["How", "did", name, "feel", "?"] and stated == [answer]
            assert text[text.index("felt") - 1] == name


def test_story_drills_of_one_kind(sp_model):
    import stories

    from mixtral_mlx.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(sp_model.parent)
    drills = drill.story_drills(tokenizer, "val", 5)
    feelings, every = drill.of_kind(drills, "how did"), drill.of_kind(drills, None)
    assert len(feelings) == 5 and len(every) > 10 * len(feelings)  # one feeling question a story
    for ids in feelings:
        assert ids[0] == tokenizer.bos_id and ids[-1] == tokenizer.eos_id
        text = tokenizer.decode(ids[1:-1])
        assert "How did" in text and text.split()[-1] in stories.FEELINGS


def test_verbatim_keeps_the_drills_whose_passage_writes_the_answer(sp_model, monkeypatch):
    import stories

    from mixtral_mlx.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(sp_model.parent)
    # The stories write every answer as the answer does ("ten-year-old" / "ten"): nothing dropped.
    assert drill.story_drills(tokenizer, "val", 8, verbatim=True) == drill.story_drills(tokenizer, "val", 8)
    monkeypatch.setattr(stories, "drill_passages", lambda story, seed, n, context: [
        ("Max was a ten-year-old boy.", "How old was Max?", "10"),
        ("Max was 10 years old.", "How old was Max?", "10"),
        ("Max had 110 cards.", "How many cards did Max have?", "10"),
    ])
    kept = drill.story_drills(tokenizer, "val", 2, verbatim=True)
    assert [tokenizer.decode(ids[1:-1]).split(".")[0] for _, ids in kept] == ["Max was 10 years old"] * 2


def test_context_zero_drills_are_the_sentences_that_state_the_answer(sp_model):
    import stories

    from mixtral_mlx.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(sp_model.parent)
    bare = drill.story_drills(tokenizer, "val", 3, context=0)
    story = stories.write_story("0:pretrain:val:0", quiz=1.0, asked=(4, 6))
    stated = {" ".join(story.sentences[i] for i in evidence) for evidence in story.evidence}
    first_story = bare[:len(story.questions)]
    for _, ids in first_story:  # the passage, then straight to the questions
        text = tokenizer.decode(ids[1:-1])
        passage = max((p for p in stated if text.startswith(p)), key=len)  # (3,) is a prefix of (3, 4)
        assert text[len(passage):].lstrip().startswith("Questions about the story")
    wider = drill.story_drills(tokenizer, "val", 3)
    assert len(wider) == len(bare) and sum(map(len, (i for _, i in wider))) > sum(map(len, (i for _, i in bare)))


class Oracle:
    """Puts all its probability on the true next token of the rows it was made for."""

    def __init__(self, rows):
        self.targets = drill.as_batch(rows)[1]

    def __call__(self, inputs):
        return mx.eye(400)[self.targets] * 100


def test_answer_hits_score_the_token_before_eos():
    vocab = drill.synthetic_vocab()
    rows = [drill.synthetic_drills(False, np.random.default_rng(i), vocab) for i in range(8)]
    assert drill.answer_hits(Oracle(rows), rows).mean() == 1.0
    wrong = [r[:-2] + [vocab["w0"], r[-1]] for r in rows]  # the answer replaced by a filler word
    assert drill.answer_hits(Oracle(wrong), rows).mean() == 0.0
    assert drill.answer_hits(lambda x: mx.zeros((*x.shape, 400)), rows).mean() == 0.0  # argmax: token 0, never an answer


def test_runs_end_to_end():
    out = subprocess.run([sys.executable, str(REPO / "scripts" / "lookup_drill.py"), "synthetic", "--steps", "2",
                          "--qk-std", "0.1"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "step 2: loss" in out.stdout and "of 256 held-out drills" in out.stdout


def test_answer_only_loss_masks_the_answers_last_token_and_eos():
    vocab = drill.synthetic_vocab()
    rows = [drill.synthetic_drills(False, np.random.default_rng(i), vocab) for i in range(4)]
    _, targets, every = drill.as_batch(rows)
    _, _, answer = drill.as_batch(rows, answer_only=True)
    for b, row in enumerate(rows):
        assert np.array(every[b]).sum() == len(row) - 1
        learned = np.array(targets[b])[np.array(answer[b]) == 1].tolist()
        assert learned == [row[-2], vocab["</s>"]]  # the feeling, then EOS


def test_stories_curriculum_runs_end_to_end_and_continues_from_its_model(sp_model, tmp_path):
    def run(*flags):
        out = subprocess.run([sys.executable, str(REPO / "scripts" / "lookup_drill.py"), "stories", "--tokenizer",
                              str(sp_model.parent), "--kind", "how old", "--steps", "2", *flags],
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr
        assert "3,000 training drills, 150 held out" in out.stdout and "step 2: loss" in out.stdout

    run("--first-steps", "1", "--save", str(tmp_path / "m"))
    assert (tmp_path / "m" / "model.safetensors").exists() and (tmp_path / "m" / "tokenizer.model").exists()
    run("--init", str(tmp_path / "m"), "--answer-loss")


def test_growing_batch_adds_one_kind_at_a_time_half_of_each_batch_the_newest():
    by_kind = {k: [[i]] for i, k in enumerate("abc")}  # one one-token "drill" a kind: its index
    rng = np.random.default_rng(0)

    def kinds(step, size=8):
        return [row[0] for row in drill.growing_batch(by_kind, list("abc"), step, 10, rng, size)]

    assert set(kinds(1)) == set(kinds(10)) == {0}  # the first kind alone for its 10 steps
    for step in (11, 20):
        assert kinds(step)[:4] == [1] * 4 and set(kinds(step)[4:]) == {0}
    seen = [k for _ in range(50) for k in kinds(25)]
    assert seen.count(2) == len(seen) // 2 and {0, 1} <= set(seen)  # half new, the rest the earlier two
    seen = [k for _ in range(200) for k in kinds(31)]  # every kind in: all alike
    assert all(abs(seen.count(k) / len(seen) - 1 / 3) < 0.05 for k in range(3))


def test_grow_refuses_a_kind_with_no_drills(sp_model):
    out = subprocess.run([sys.executable, str(REPO / "scripts" / "lookup_drill.py"), "stories", "--tokenizer",
                          str(sp_model.parent), "--grow", "1", "--order", "how did,why not", "--steps", "2"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "--order: no drills of ['why not']" in out.stderr
