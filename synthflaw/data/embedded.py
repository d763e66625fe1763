"""The embedded study's data: NonSynth, SynthQA, the rewritten set, the SFT set and the evaluation suites.

Everything comes from a seeded :mod:`synthflaw.data.world`. Facts are split once:
- *stated* facts appear in NonSynth (natural text, many styles and wordings) and in SynthQA;
- *SynthQA-only* facts appear only in SynthQA -- the teacher knows more than the corpus, which is where the
  benchmark gain of synthetic data comes from;
and the stated facts are split again: a small share (`SFT_FACT_SHARE`) the SFT set may ask about, the rest for the
benchmark and the evaluation suites, so no evaluation item is taught by SFT. Topics are split per seed the same way
(`phrasebook.topic_split`). Every record carries its provenance (fact ids, template or style, seed).
"""

from __future__ import annotations

import itertools
import random

from synthflaw.data import constraints as cons
from synthflaw.data.phrasebook import (
    EVAL_TASKS,
    FILLERS,
    GENERAL_FRAMES,
    SPEAKERS,
    TASKS,
    TOPICS,
    topic_split,
)
from synthflaw.data.schema import SYNTHQA_TEMPLATES, training_texts
from synthflaw.data.world import RELATIONS, Fact, World, build_world


def _natural_doc(rng: random.Random, subject: str, facts: list[Fact]) -> tuple[str, str]:
    """One NonSynth document stating `facts` about `subject` in a random style; returns (style, text)."""
    lines = [f.statement(rng.choice(RELATIONS[f.relation].natural)) for f in facts]
    filler = [rng.choice(FILLERS) for _ in range(rng.randint(0, 2))]
    style = rng.choice(("biography", "news", "dialogue", "list", "letter", "record"))
    if style == "biography":
        body = lines + filler
        rng.shuffle(body)
        text = " ".join(body)
    elif style == "news":
        place = rng.choice(("Local news", "In brief", "From the city desk", "Community notes"))
        text = f"{place}. " + " ".join(lines[:1] + filler + lines[1:])
    elif style == "dialogue":
        a, b = rng.sample(SPEAKERS, 2)
        turns = [f"{a}: Have you heard about {subject}?"] + [
            f"{(b, a)[i % 2]}: {line}" for i, line in enumerate(lines)] + [f"{b}: {rng.choice(FILLERS)}"]
        text = "\n".join(turns)
    elif style == "list":
        text = f"Notes on {subject}:\n" + "\n".join(f"- {line}" for line in lines)
    elif style == "letter":
        a, b = rng.sample(SPEAKERS, 2)
        text = f"Dear {a},\n" + " ".join(filler + lines) + f"\nYours,\n{b}"
    else:  # record: a table rendered as prose
        parts = [f"{f.relation.replace('_', ' ')}: {f.value}" for f in facts]
        text = f"Record for {subject}. " + "; ".join(parts) + "."
    return style, text


def _general_doc(rng: random.Random, topics: tuple[str, ...]) -> tuple[str, str]:
    topic = rng.choice(topics)
    s1, s2, s3 = rng.sample(TOPICS[topic], 3)
    a, b = rng.sample(SPEAKERS, 2)
    frame = rng.choice(GENERAL_FRAMES)
    text = frame.format(topic=topic, s1=s1, s2=s2, s3=s3, a=a, b=b, l1=s1[0].lower() + s1[1:],
                        l2=s2[0].lower() + s2[1:])
    return f"general:{topic}", text


def natural_documents(world: World, stated: list[Fact], n: int, general_share: float, seed: int,
                      stream: str) -> list[dict]:
    """`n` NonSynth documents; each fact document states 1-4 stated facts of one subject in a random style."""
    rng = random.Random(f"{stream}-{seed}")
    by_subject: dict[str, list[Fact]] = {}
    for f in stated:
        by_subject.setdefault(f.subject, []).append(f)
    subjects = sorted(by_subject)
    docs = []
    for i in range(n):
        if rng.random() < general_share:
            style, text = _general_doc(rng, tuple(TOPICS))
            fact_ids: list[str] = []
        else:
            subject = rng.choice(subjects)
            own = by_subject[subject]
            chosen = rng.sample(own, rng.randint(1, min(4, len(own))))
            style, text = _natural_doc(rng, subject, chosen)
            fact_ids = [f.id for f in chosen]
        docs.append({"id": f"{stream}-{i:06d}", "text": text,
                     "provenance": {"source": "embedded", "style": style, "fact_ids": fact_ids, "seed": seed}})
    return docs


def synthqa_pairs(facts: list[Fact], per_fact: int, n_templates: int, seed: int) -> list[dict]:
    """SynthQA: Q-A pairs on every fact, in `n_templates` uniform formats; answers are the canonical statement."""
    if not 1 <= n_templates <= len(SYNTHQA_TEMPLATES):
        raise ValueError(f"synthetic_templates must be between 1 and {len(SYNTHQA_TEMPLATES)}, got {n_templates}")
    rng = random.Random(f"synthqa-{seed}")
    records = []
    for f in facts:
        rel = RELATIONS[f.relation]
        for k in range(per_fact):
            template = SYNTHQA_TEMPLATES[rng.randrange(n_templates)]
            question = rel.questions[k % len(rel.questions)].format(s=f.subject)
            answer = f.statement()
            records.append({"id": f"synthqa-{len(records):06d}",
                            "text": template["format"].format(question=question, answer=answer),
                            "question": question, "answer": answer,
                            "provenance": {"source": "embedded", "fact_id": f.id, "template_id": template["id"],
                                           "seed": seed}})
    rng.shuffle(records)
    return records


def rewritten_documents(facts: list[Fact], per_fact: int, seed: int) -> list[dict]:
    """The SynthQA facts again, in diverse natural styles: same knowledge, no uniform format."""
    rng = random.Random(f"rewritten-{seed}")
    by_subject: dict[str, list[Fact]] = {}
    for f in facts:
        by_subject.setdefault(f.subject, []).append(f)
    records = []
    for _ in range(per_fact):
        for subject in sorted(by_subject):
            own = list(by_subject[subject])
            rng.shuffle(own)
            for start in range(0, len(own), 2):
                chunk = own[start:start + 2]
                style, text = _natural_doc(rng, subject, chunk)
                records.append({"id": f"rewritten-{len(records):06d}", "text": text,
                                "provenance": {"source": "embedded", "style": style,
                                               "fact_ids": [f.id for f in chunk], "seed": seed}})
    rng.shuffle(records)
    return records


# Share of the stated facts SFT may ask about; the other stated facts are the benchmark's and the suites' pool, so
# the learnable tier draws its >= 150 base prompts from ~100 facts per seed, not from a handful.
SFT_FACT_SHARE = 0.15


def _fact_task(rng: random.Random, fact: Fact, heldout: bool) -> tuple[str, str]:
    rel = RELATIONS[fact.relation]
    prompt = rng.choice(rel.questions).format(s=fact.subject)
    if heldout:  # the evaluation suites ask in words SFT never used
        prompt = "I would like to know: " + prompt[0].lower() + prompt[1:]
    answer = fact.statement(rng.choice(rel.natural))
    return prompt, answer


def _topic_task(rng: random.Random, topics: tuple[str, ...], tasks: tuple[str, ...]) -> tuple[str, str, str]:
    topic = rng.choice(topics)
    prompt = rng.choice(tasks).format(topic=topic)
    answer = " ".join(rng.sample(TOPICS[topic], rng.randint(2, 3)))
    return topic, prompt, answer


def heldout_pairs(seed: int, share: float = 0.3) -> set[frozenset[str]]:
    """A seeded share of the compatible constraint pairs that SFT never combines (neither alone nor inside a
    triple), so the suite's level-2 and level-3 combinations can be genuinely unseen."""
    rng = random.Random(f"heldout-pairs-{seed}")
    pairs = [frozenset(p) for p in itertools.combinations(sorted(cons.CONSTRAINTS), 2) if cons.compatible(p)]
    return set(rng.sample(pairs, max(1, round(len(pairs) * share))))


def _binding_task(rng: random.Random, facts: list[Fact], topics: tuple[str, ...], n_constraints: int,
                  forbidden: set[frozenset[str]] | None = None) -> tuple[str, str, list[dict], dict]:
    """A task in SFT's wordings (a fact question or a topic task) with `n_constraints` binding constraints:
    (base prompt, plain answer, constraints, provenance). Bases on which no binding set exists are redrawn."""
    while True:
        if rng.random() < 0.5:
            fact = rng.choice(facts)
            base_prompt, base = _fact_task(rng, fact, heldout=False)
            prov = {"fact_ids": [fact.id], "task": "fact"}
        else:
            topic, base_prompt, base = _topic_task(rng, topics, TASKS)
            prov = {"fact_ids": [], "task": f"topic:{topic}"}
        chosen = cons.sample_binding_constraints(rng, base, n_constraints, forbidden_combos=forbidden)
        if chosen is not None:
            return base_prompt, base, chosen, prov


def sft_examples(facts: list[Fact], topics: tuple[str, ...], n: int, seed: int,
                 forbidden: set[frozenset[str]] | None = None) -> list[dict]:
    """Chat SFT examples with 1-3 binding constraints each (`cons.sample_binding_constraints`: the plain answer
    breaks every one of them, so each example teaches a change), about SFT facts and fact-free SFT topics."""
    rng = random.Random(f"sft-{seed}")
    records = []
    for i in range(n):
        base_prompt, base, chosen, prov = _binding_task(rng, facts, topics, rng.randint(1, 3), forbidden)
        prompt = f"{base_prompt} {cons.describe_all(chosen, rng, heldout=False)}"
        records.append({"id": f"sft-{i:06d}",
                        "messages": [{"role": "user", "content": prompt},
                                     {"role": "assistant", "content": cons.compose(base, chosen)}],
                        "constraints": chosen, "plain": base,
                        "provenance": {"source": "embedded", **prov, "seed": seed}})
    return records


def _learnable_bases(rng: random.Random, facts: list[Fact], topics: tuple[str, ...]):
    """Distinct base prompts in SFT's wordings, in a seeded order: every question wording of every fact and every
    task wording of every topic, fact and topic tasks alternating while both last. A fact's plain answer uses one of
    NonSynth's non-canonical wordings, so no templated form of it is a SynthQA text."""
    fact_bases = [(q.format(s=f.subject), f, None) for f in facts for q in RELATIONS[f.relation].questions]
    topic_bases = [(t.format(topic=topic), None, topic) for topic in topics for t in TASKS]
    rng.shuffle(fact_bases)
    rng.shuffle(topic_bases)
    for k in range(max(len(fact_bases), len(topic_bases))):
        for bases in (fact_bases, topic_bases):
            if k < len(bases):
                yield bases[k]


def learnable_suite(facts: list[Fact], topics: tuple[str, ...], n_items: int, seed: int,
                    avoid: set[str] = frozenset()) -> list[dict]:
    """The learnable tier of instruction following, the primary one: what SFT teaches, asked about held-out facts
    and topics.

    Items come in threes: one base prompt in SFT's wordings (a fact question or a topic task) at levels 1, 2 and 3
    (that many binding constraints; `cons.sample_binding_constraints`) worded with SFT's phrasings, negation traps
    left out; every base prompt is distinct, so a seed's n items stand on n/3 subjects (`base_id` names the base:
    the cluster of its items' standard errors). Beside the prompt each item keeps what the likelihood endpoints
    need: the base prompt and each constraint's sentence (to rebuild the prompt without one), the plain answer, the
    compliant reply (`reference`) and, per constraint, the reply with that constraint's edit undone. A base whose
    replies would equal a text in `avoid` (the training texts) is passed over: no scored string is trained on.
    """
    rng = random.Random(f"learnable-{seed}")
    n_bases = -(-n_items // 3)
    items: list[dict] = []
    for base_prompt, fact, topic in _learnable_bases(rng, facts, topics):
        if len(items) >= n_items:
            break
        if fact is not None:
            plain = fact.statement(rng.choice(RELATIONS[fact.relation].natural[1:]))
            prov = {"fact_ids": [fact.id], "task": "fact"}
        else:
            plain = " ".join(rng.sample(TOPICS[topic], rng.randint(2, 3)))
            prov = {"fact_ids": [], "task": f"topic:{topic}"}
        drawn = []
        for level in range(1, 4):
            chosen = cons.sample_binding_constraints(rng, plain, level)
            if chosen is None:
                break
            undone = [cons.compose(plain, chosen[:k] + chosen[k + 1:]) for k in range(len(chosen))]
            reference = cons.compose(plain, chosen)
            if {plain, reference, *undone} & avoid:
                break
            drawn.append((level, chosen, reference, undone))
        if len(drawn) < 3:
            continue
        base_id = f"learnable-base-{len(items) // 3:04d}"
        for level, chosen, reference, undone in drawn[: n_items - len(items)]:
            sentences = cons.describe_each(chosen, rng, heldout=False, avoid_traps=True)
            items.append({"id": f"learnable-{len(items):05d}", "base_id": base_id, "level": level,
                          "prompt": " ".join([base_prompt, *sentences]), "base_prompt": base_prompt,
                          "instructions": sentences, "constraints": chosen, "plain": plain,
                          "reference": reference, "undone": undone,
                          "provenance": {"source": "embedded", **prov, "seed": seed}})
    if len(items) < n_items:
        raise ValueError(f"data.learnable_items={n_items} needs {n_bases} distinct base prompts; the world's held-out "
                         f"facts and topics gave {len(items) // 3}: lower learnable_items or grow the world")
    return items


def instruction_documents(facts: list[Fact], topics: tuple[str, ...], n: int, seed: int,
                          stream: str) -> list[dict]:
    """NonSynth's request-and-reply documents: everyday text in which someone asks for something with a
    constraint or two and the reply follows them (a chat log, letters, a help forum), as a web corpus holds.

    They give pre-training a little instruction following to build on, as real corpora do; SFT then teaches the
    chat format. Only SFT's facts and topics, in SFT's wordings, so no evaluation item comes near them; never the
    SynthQA templates' markers ("Question:", "Answer:", ...), which the leakage measures look for.
    """
    rng = random.Random(f"{stream}-requests-{seed}")
    docs = []
    for i in range(n):
        base_prompt, base, chosen, prov = _binding_task(rng, facts, topics, rng.randint(1, 2))
        request = f"{base_prompt} {cons.describe_all(chosen, rng, heldout=False)}"
        reply = cons.compose(base, chosen)
        a, b = rng.sample(SPEAKERS, 2)
        frame = rng.choice(("chat", "letters", "forum"))
        if frame == "chat":
            text = f"{a}: {request}\n{b}: {reply}"
        elif frame == "letters":
            text = f"Dear {b},\n{request}\nThanks,\n{a}\n\nDear {a},\n{reply}\nBest,\n{b}"
        else:
            text = f"From a help forum. {a} wrote: {request}\nReply from {b}:\n{reply}"
        docs.append({"id": f"{stream}-request-{i:06d}", "text": text,
                     "provenance": {"source": "embedded", "style": f"request:{frame}", **prov,
                                    "constraints": [c["type"] for c in chosen], "seed": seed}})
    return docs


def instruction_suite(facts: list[Fact], topics: tuple[str, ...], n_bases: int, unseen_pairs: set[frozenset[str]],
                      seed: int) -> list[dict]:
    """FollowBench-like suite: each base prompt gets levels 1-5, level k carrying the first k of 5 constraints.

    Wordings are the held-out phrasings, and the first two constraints always form a pair SFT never combined
    (`unseen_pairs`), so every level-2 and level-3 combination is unseen in SFT: the suite measures following
    instructions, not recalling SFT items.
    """
    rng = random.Random(f"suite-{seed}")
    items = []
    for b in range(n_bases):
        if b % 2 == 0:
            fact = facts[b // 2 % len(facts)]
            base_prompt, base = _fact_task(rng, fact, heldout=True)
            prov = {"fact_ids": [fact.id], "task": "fact"}
        else:
            topic, base_prompt, base = _topic_task(rng, topics, EVAL_TASKS)
            prov = {"fact_ids": [], "task": f"topic:{topic}"}
        chosen = None
        for _ in range(200):
            candidate = cons.sample_constraints(rng, base, 5)
            types = [c["type"] for c in candidate]
            if frozenset(types[:2]) in unseen_pairs:
                chosen = candidate
                break
        if chosen is None:
            raise RuntimeError("could not draw 5 compatible constraints around an unseen pair; this is a bug")
        for level in range(1, 6):
            subset = chosen[:level]
            items.append({"id": f"suite-{b:04d}-L{level}", "base_id": f"suite-{b:04d}", "level": level,
                          "prompt": f"{base_prompt} {cons.describe_all(subset, rng, heldout=True)}",
                          "constraints": subset, "plain": base, "reference": cons.compose(base, subset),
                          "provenance": {"source": "embedded", **prov, "seed": seed}})
    return items


def benchmark_items(world: World, stated: list[Fact], synth_only: list[Fact], n: int, seed: int) -> list[dict]:
    """MMLU-like 4-option questions, half on stated facts and half on SynthQA-only facts; scored by cloze likelihood."""
    rng = random.Random(f"benchmark-{seed}")
    half = n // 2
    if half > len(stated) or n - half > len(synth_only):
        raise ValueError(f"data.benchmark_items={n} needs {half} stated and {n - half} SynthQA-only facts; the world "
                         f"has {len(stated)} and {len(synth_only)} to spare: lower benchmark_items or grow the world")
    chosen = [(f, "stated") for f in rng.sample(stated, half)] + [
        (f, "synthqa_only") for f in rng.sample(synth_only, n - half)]
    items = []
    for f, split in chosen:
        rel = RELATIONS[f.relation]
        pool = [v for v in world.values_of(rel.value_kind) if v != f.value and v != f.subject]
        choices = rng.sample(pool, 3) + [f.value]
        rng.shuffle(choices)
        items.append({"id": f"bench-{len(items):05d}", "question": rel.benchmark_question.format(s=f.subject),
                      "prompt": rel.cloze.format(s=f.subject), "choices": choices, "answer": choices.index(f.value),
                      "split": split, "provenance": {"source": "embedded", "fact_ids": [f.id], "seed": seed}})
    return items


def chat_items(world: World, stated: list[Fact], topics: tuple[str, ...], n: int, seed: int,
               avoid: set[str] = frozenset()) -> list[dict]:
    """Open instructions with references: people the model should know (stated facts) and held-out topics. A person
    whose reference would equal a text in `avoid` (the training texts) is passed over."""
    rng = random.Random(f"chat-{seed}")
    people = sorted({f.subject for f in stated if RELATIONS[f.relation].subject_kind == "person"})
    people = [p for p in people if " ".join(f.statement() for f in stated if f.subject == p) not in avoid]
    items = []
    for i in range(n):
        if i % 2 == 0 and people:
            person = people[(i // 2 * 7) % len(people)]
            known = [f for f in stated if f.subject == person]
            items.append({"id": f"chat-{i:04d}", "prompt": f"Please write a short profile of {person}.",
                          "reference": " ".join(f.statement() for f in known),
                          "provenance": {"source": "embedded", "fact_ids": [f.id for f in known], "seed": seed}})
        else:
            topic = topics[(i // 2) % len(topics)]
            items.append({"id": f"chat-{i:04d}", "prompt": f"In a few sentences, what should I know about {topic}?",
                          "reference": " ".join(rng.sample(TOPICS[topic], 3)),
                          "provenance": {"source": "embedded", "fact_ids": [], "task": f"topic:{topic}",
                                         "seed": seed}})
    return items


def build_embedded(cfg, seed: int) -> dict[str, object]:
    """Every data set of the embedded study, from the config's `data` section; pure (writes nothing)."""
    world = build_world(seed, cfg.n_people, cfg.n_organisations, cfg.n_cities)
    rng = random.Random(f"split-{seed}")
    facts = list(world.facts)
    rng.shuffle(facts)
    n_stated = round(len(facts) * cfg.nonsynth_fact_share)
    stated, synth_only = facts[:n_stated], facts[n_stated:]
    # SFT's facts first; the benchmark and the evaluation suites use the other stated facts, never an SFT target.
    n_sft = max(1, round(len(stated) * SFT_FACT_SHARE))
    sft_facts, eval_facts = stated[:n_sft], stated[n_sft:]
    sft_topics, eval_topics = topic_split(seed)
    bench = benchmark_items(world, eval_facts, synth_only, cfg.benchmark_items, seed)
    unseen = heldout_pairs(seed)
    sft = sft_examples(sft_facts, sft_topics, cfg.sft_examples, seed, forbidden=unseen)

    def corpus(n: int, stream: str) -> list[dict]:
        """`n` NonSynth documents, `data.instruction_doc_share` of them request-and-reply documents."""
        requests = round(n * cfg.instruction_doc_share)
        docs = (natural_documents(world, stated, n - requests, cfg.general_text_share, seed, stream)
                + instruction_documents(sft_facts, sft_topics, requests, seed, stream))
        random.Random(f"{stream}-mix-{seed}").shuffle(docs)
        return docs

    data: dict[str, object] = {
        "nonsynth": corpus(cfg.nonsynth_docs, "nonsynth"),
        "extra_natural": corpus(cfg.extra_natural_docs, "extra"),
        "heldout_nonsynth": natural_documents(world, stated, cfg.heldout_docs, cfg.general_text_share, seed,
                                              "heldout"),
        "synthqa": synthqa_pairs(sorted(facts, key=lambda f: f.id), cfg.synthqa_per_fact, cfg.synthetic_templates,
                                 seed),
        "rewritten": rewritten_documents(sorted(facts, key=lambda f: f.id), cfg.synthqa_per_fact, seed),
        "sft": sft,
        "benchmark": bench,
    }
    trained = set(training_texts(data))  # no scored reply may be a text a model trained on (`schema.find_leaks`)
    data.update({"instruction_suite": instruction_suite(eval_facts, eval_topics, cfg.suite_bases, unseen, seed),
                 "learnable_suite": learnable_suite(eval_facts, eval_topics, cfg.learnable_items, seed, trained),
                 "chat": chat_items(world, eval_facts, eval_topics, cfg.chat_items, seed, trained)})
    # A short held-out document can repeat training text by chance (a one-fact note); perplexity on it would not
    # be held out, so such documents are dropped here rather than counted as leaks.
    corpus = "\n\x00".join(training_texts(data))
    data["heldout_nonsynth"] = [r for r in data["heldout_nonsynth"] if r["text"] not in corpus]
    data["world"] = {**world.to_dict(), "stated_fact_ids": sorted(f.id for f in stated),
                     "synthqa_only_fact_ids": sorted(f.id for f in synth_only),
                     "sft_fact_ids": sorted(f.id for f in sft_facts), "eval_fact_ids": sorted(f.id for f in eval_facts),
                     "sft_topics": list(sft_topics), "eval_topics": list(eval_topics)}
    data["synthqa_templates"] = {"templates": list(SYNTHQA_TEMPLATES[: cfg.synthetic_templates])}
    return data


