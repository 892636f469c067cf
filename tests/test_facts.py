"""The natural-language facts task of dowser.tasks: reproducible from its seed, and its held-out
questions never seen in training (neither their wording nor their strings)."""

import pytest

from dowser.tasks import FACT_TEMPLATES, CharTokenizer, fact_examples, make_facts


def test_same_seed_same_world_other_seed_other_world():
    a, b, c = make_facts(3), make_facts(3), make_facts(4)
    assert a == b
    assert a.people != c.people and a.test != c.test


def test_every_fact_taught_and_asked_once_per_held_out_split():
    w = make_facts(0, n_people=10)
    assert len({name for name, _ in w.people}) == 10
    facts = {(name, attr): v for name, f in w.people for attr, v in f.items()}
    for split in (w.val, w.test):
        assert sorted((p.person, p.attribute) for p in split) == sorted(facts)
        assert all(p.answer == f" {facts[p.person, p.attribute]}\n" for p in split)
    taught = {(p.person, p.attribute) for p in w.train if p.template.startswith("statement/")}
    assert taught == set(facts)


def test_held_out_wordings_and_strings_never_in_training():
    splits = ("statement", "train", "val", "test")
    temps = {s: {t for ts in FACT_TEMPLATES[s].values() for t in ts} for s in splits}
    for i, s in enumerate(splits):
        for o in splits[i + 1:]:
            assert not temps[s] & temps[o], (s, o)
    for seed in (0, 1, 2):
        w = make_facts(seed)
        train_prompts = [p.prompt for p in w.train]
        train_text = "\n".join(p.prompt + p.answer for p in w.train)
        assert all(p.template.split("/")[0] in ("statement", "train") for p in w.train)
        for held in (w.val, w.test):
            for p in held:
                assert p.template.split("/")[0] in ("val", "test")
                # the question is not in training, nor contains a training prompt
                assert p.prompt not in train_text
                assert not any(t in p.prompt for t in train_prompts), p.prompt
        assert not {p.prompt for p in w.val} & {p.prompt for p in w.test}


def test_examples_put_the_answer_after_the_prompt():
    tok = CharTokenizer()
    w = make_facts(0, n_people=2)
    ex = fact_examples(tok, w.test, bos_id=tok.bos_token_id)
    assert ex[0].prompt[0] == tok.bos_token_id
    assert tok.decode(ex[0].prompt[1:]) == w.test[0].prompt and tok.decode(ex[0].answer) == w.test[0].answer
    with pytest.raises(ValueError, match="n_people"):
        make_facts(0, n_people=0)
