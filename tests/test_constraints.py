"""Verifiable instruction constraints: checker tables, the compose property, loose vs strict, errors, and agreement
with IFEval's reference checkers (the `if-verifiable` package)."""

import itertools
import json
import random

import pytest

from synthflaw.data import constraints as C

# (response, args, expected strict verdict), per constraint type; every type has True and False rows.
TABLE = {
    "lowercase": [
        ("the quick brown fox jumps over the lazy dog and then runs far into the green forest.", {}, True),
        ("The quick brown fox jumps over the lazy dog and then runs far into the green forest.", {}, False),
        ("12345 67890", {}, False),
    ],
    "uppercase": [
        ("THE QUICK BROWN FOX JUMPS OVER THE LAZY DOG AND THEN RUNS FAR INTO THE GREEN FOREST.", {}, True),
        ("THE QUICK BROWN FOX JUMPS OVER THE LAZY DOG AND THEN RUNS FAR INTO THE GREEN FORESt.", {}, False),
        ("12345 67890", {}, False),
    ],
    "start_with": [
        ("Good question. Paris is the capital.", {"phrase": "Good question."}, True),
        ('"good question. Paris is the capital."', {"phrase": "Good question."}, True),
        ("  Here is my answer:\n* one", {"phrase": "Here is my answer:"}, True),
        ("Well. Good question.", {"phrase": "Good question."}, False),
        ("Good", {"phrase": "Good question."}, False),
    ],
    "end_with": [
        ("Paris is the capital. Any other questions?", {"phrase": "Any other questions?"}, True),
        ('"Paris is the capital. any other questions?"  \n', {"phrase": "Any other questions?"}, True),
        ("Any other questions? Paris is the capital.", {"phrase": "Any other questions?"}, False),
        ("Paris is the capital. Any other questions", {"phrase": "Any other questions?"}, False),
    ],
    "include_keywords": [
        ("History and culture shape a city.", {"keywords": ["history", "culture"]}, True),
        ("HISTORY matters.", {"keywords": ["history"]}, True),
        ("History matters.", {"keywords": ["history", "culture"]}, False),
        ("Nothing relevant here.", {"keywords": ["science"]}, False),
    ],
    "exclude_keyword": [
        ("It is really big.", {"word": "very"}, True),
        ("Everything is fine.", {"word": "very"}, True),
        ("It is very big.", {"word": "very"}, False),
        ("VERY big.", {"word": "very"}, False),
    ],
    "no_commas": [
        ("No commas in this sentence.", {}, True),
        ("A full-width \uff0c is not an ASCII comma.", {}, True),
        ("One, two.", {}, False),
        ("It cost 1,000 coins.", {}, False),
    ],
    "max_words": [
        ("one two three", {"n": 3}, True),
        ("one two three four", {"n": 3}, False),
        ("it's 1,000", {"n": 3}, False),  # it, s, 1, 000: four \w+ words
        ("* one\n* two", {"n": 2}, True),
    ],
    "min_words": [
        ("one two three", {"n": 3}, True),
        ("it's 1,000", {"n": 4}, True),
        ("one two", {"n": 3}, False),
        ("", {"n": 1}, False),
    ],
    "num_sentences": [
        ("One. Two! Three?", {"relation": "at least", "n": 3}, True),
        ("One. Two.", {"relation": "at least", "n": 3}, False),
        ("Dr. Venn was born in 1,204. She left.", {"relation": "at most", "n": 2}, True),
        ("Paris is big. It is old. People like it.", {"relation": "at most", "n": 2}, False),
        ("No end punctuation at all", {"relation": "at least", "n": 1}, True),
        ('He said "Hi." Then he left.', {"relation": "at least", "n": 2}, True),
        ("Body text.\n\nP.S. I hope this helps.", {"relation": "at most", "n": 2}, True),
    ],
    "bullet_list": [
        ("* one\n* two", {"n": 2}, True),
        ("Intro line\n* one\n* two\nOutro", {"n": 2}, True),
        ("- one\n- two", {"n": 2}, True),
        ("* one\n* two\n* three", {"n": 2}, False),
        ("**bold** text\n* one", {"n": 1}, True),
        ("one * two", {"n": 1}, False),
    ],
    "json_format": [
        ('{"response": "hi"}', {}, True),
        ('```json\n{"a": 1}\n```', {}, True),
        ("[1, 2]", {}, True),
        ('Here it is: {"a": 1}', {}, False),
        ("{a: 1}", {}, False),
    ],
    "quotation": [
        ('"Paris is the capital."', {}, True),
        ('  "x"  ', {}, True),
        ('"unterminated', {}, False),
        ('"', {}, False),
        ("Paris.", {}, False),
    ],
    "title": [
        ("<<My Title>>\nThe body.", {}, True),
        ("The body <<Inline Title>> more.", {}, True),
        ("<<  >>\nThe body.", {}, False),
        ("<<split\ntitle>>", {}, False),
        ("No title here.", {}, False),
    ],
    "postscript": [
        ("Body.\n\nP.S. Thanks for reading.", {"marker": "P.S."}, True),
        ("Body.\np. s. thanks", {"marker": "P.S."}, True),
        ('"Body.\n\nP.P.S. More."', {"marker": "P.P.S."}, True),
        ("Body.\n\nP.S. Thanks.", {"marker": "P.P.S."}, False),
        ("Body without a postscript.", {"marker": "P.S."}, False),
        ("Body.\nPS thanks", {"marker": "P.S."}, False),
    ],
}

BASES = [
    "Paris is the capital of France.",
    "Yes",
    "The Eiffel Tower is very big, and it is known worldwide. It was built in 1889, for the World's Fair. "
    "Many people visit it; however, few climb the stairs!",
    '"Hello, there," she said. Then she left quickly, without a word.\nThe main point is simple: be kind.',
    "Ilara Venn was born in Corvath in 1,204 and moved to Osk in 1,240",
    "Dr. Venn, a good teacher, often said: \"History matters.\" Why? Because it does.",
    "Here are three things:\n- bread\n- milk\n- eggs",
    "It's a small town. Its main street is old, narrow and quiet. Usually, visitors begin at the harbour.",
    "1. Boil the water.\n2. Add the tea.\n3. Wait three minutes",
    '"Already quoted, as you see." NASA is BIG... Wow?!',
]


def _ifeval_instructions():
    return pytest.importorskip("if_verifiable.ifeval.instructions",
                               reason="if-verifiable (IFEval's reference checkers) is a dev dependency")


# ---------------------------------------------------------------------------------------------- checker tables


def test_every_type_has_true_and_false_rows():
    assert set(TABLE) == set(C.CONSTRAINTS)
    for cid, rows in TABLE.items():
        assert {expected for _, _, expected in rows} == {True, False}, cid


@pytest.mark.parametrize("cid,response,args,expected",
                         [(cid, r, a, e) for cid, rows in TABLE.items() for r, a, e in rows])
def test_checker_table(cid, response, args, expected):
    assert C.CONSTRAINTS[cid].check(response, args) is expected
    # through the public API too (which also fails an empty response on everything)
    assert C.check_response(response, [{"type": cid, "args": args}]) == [expected and bool(response.strip())]


def test_split_sentences():
    assert C.split_sentences("Dr. Venn lives in St. Osk. She is e.g. kind!") == [
        "Dr. Venn lives in St. Osk.", "She is e.g. kind!"]
    assert C.split_sentences('He said "Hi." Then left') == ['He said "Hi."', "Then left"]
    assert C.split_sentences("Pi is 3.14 today. Yes.") == ["Pi is 3.14 today.", "Yes."]
    assert C.split_sentences("<<Title>>\nFirst one. Second one.") == ["<<Title>>\nFirst one.", "Second one."]
    assert C.split_sentences("...") == []
    assert C.split_sentences("1. Boil water.\n2. Add tea.") == ["1. Boil water.", "2. Add tea."]  # list numbers


def test_empty_response_fails_every_constraint():
    cs = [{"type": "exclude_keyword", "args": {"word": "very"}}, {"type": "no_commas", "args": {}}]
    assert C.check_response("  \n", cs) == [False, False]
    assert C.check_response_loose("", cs) == [False, False]


# ---------------------------------------------------------------------------------------------- registry


def test_registry_shape():
    assert len(C.CONSTRAINTS) >= 12
    assert sorted(C.APPLY_ORDER) == sorted(C.CONSTRAINTS)
    for cid, c in C.CONSTRAINTS.items():
        assert c.id == cid
        assert len(c.train_phrasings) >= 2 and len(c.heldout_phrasings) >= 1, cid
        assert set(c.train_phrasings).isdisjoint(c.heldout_phrasings), cid
        assert c.conflicts <= set(C.CONSTRAINTS) and cid not in c.conflicts, cid
        for other in c.conflicts:  # symmetric, so both classes tell the truth about a pair
            assert cid in C.CONSTRAINTS[other].conflicts, (cid, other)


def test_many_distinct_compatible_five_sets():
    fives = [combo for combo in itertools.combinations(C.CONSTRAINTS, 5) if C.compatible(combo)]
    assert len(fives) >= 30
    assert not C.compatible(["lowercase", "uppercase"])
    assert not C.compatible(["title", "title"])
    assert C.compatible(["lowercase", "no_commas", "bullet_list", "title", "postscript"])


def test_added_text_never_undoes_exclusion_or_no_commas():
    added = [*C.START_PHRASES, *C.END_PHRASES, *C.KEYWORDS, *C.POSTSCRIPT_NOTES, *C.POSTSCRIPT_MARKERS,
             C.FILLER_SENTENCE, C.JSON_KEY, "This answer touches on and", "Answer"]
    for text in added:
        assert "," not in text, text
        for word in C.EXCLUDABLE_WORDS:
            assert not C._has_word(text, word), (text, word)
    for word, synonym in C.EXCLUDABLE_WORDS.items():
        assert C.count_words(synonym) == 1 and synonym not in C.EXCLUDABLE_WORDS, word
    assert set(C.KEYWORDS).isdisjoint(C.EXCLUDABLE_WORDS)


# ---------------------------------------------------------------------------------------------- wording


def test_heldout_wording_never_equals_train_wording():
    rng = random.Random(0)
    for cid, c in C.CONSTRAINTS.items():
        for base in BASES:
            args = c.sample_args(rng, base)
            train = {p.format(**c.wording_fields(args)) for p in c.train_phrasings}
            heldout = {p.format(**c.wording_fields(args)) for p in c.heldout_phrasings}
            assert train.isdisjoint(heldout), cid
            for seed in range(6):
                assert c.describe(args, random.Random(seed), heldout=True) in heldout
                assert c.describe(args, random.Random(seed), heldout=False) in train


def test_describe_all_is_deterministic_and_joins_one_sentence_each():
    cs = C.sample_constraints(random.Random(3), BASES[2], 4)
    a = C.describe_all(cs, random.Random(7), heldout=True)
    assert a == C.describe_all(cs, random.Random(7), heldout=True)
    assert a != C.describe_all(cs, random.Random(7), heldout=False)
    assert "{" not in a and "}" not in a  # every format field filled


# ---------------------------------------------------------------------------------------------- sampling


def test_sample_constraints_is_deterministic_compatible_and_feasible():
    for seed in range(20):
        base = BASES[seed % len(BASES)]
        a = C.sample_constraints(random.Random(seed), base, 5)
        assert a == C.sample_constraints(random.Random(seed), base, 5)
        assert json.loads(json.dumps(a)) == a
        types = [c["type"] for c in a]
        assert len(types) == 5 and C.compatible(types)
        for c in a:
            C.CONSTRAINTS[c["type"]].validate(c["args"])


def test_sample_args_pick_args_that_bite():
    rng = random.Random(0)
    base = BASES[2]
    for _ in range(20):
        assert C.CONSTRAINTS["max_words"].sample_args(rng, base)["n"] >= C.count_words(base) + C.MAX_WORDS_SLACK
        assert C.CONSTRAINTS["min_words"].sample_args(rng, base)["n"] <= C.count_words(base)
        kws = C.CONSTRAINTS["include_keywords"].sample_args(rng, base)["keywords"]
        assert not any(k in base.lower() for k in kws)
        assert C._has_word(base, C.CONSTRAINTS["exclude_keyword"].sample_args(rng, base)["word"])
        assert C.CONSTRAINTS["bullet_list"].sample_args(rng, base)["n"] <= C.count_sentences(base)
    assert C.CONSTRAINTS["bullet_list"].sample_args(rng, "Paris is the capital of France.") == {"n": 1}


def test_sample_constraints_respects_types_and_forbidden_combos():
    rng = random.Random(1)
    allowed = ["lowercase", "no_commas", "title", "postscript", "quotation"]
    forbidden = {frozenset({"lowercase", "no_commas"})}
    seen = set()
    for _ in range(60):
        types = frozenset(c["type"] for c in C.sample_constraints(rng, BASES[0], 3, forbidden, allowed))
        assert types <= set(allowed) and not {"lowercase", "no_commas"} <= types
        seen.add(types)
    assert len(seen) > 1
    # the only compatible pairs of these three are both forbidden
    with pytest.raises(ValueError, match="forbidden"):
        C.sample_constraints(rng, BASES[0], 2, {frozenset({"lowercase", "no_commas"}),
                                                frozenset({"uppercase", "no_commas"})},
                             ["lowercase", "uppercase", "no_commas"])


def test_sample_constraints_errors():
    rng = random.Random(0)
    with pytest.raises(ValueError, match="valid types"):
        C.sample_constraints(rng, BASES[0], 1, types=["lowercase", "shouting"])
    with pytest.raises(ValueError, match="n=3"):
        C.sample_constraints(rng, BASES[0], 3, types=["lowercase", "title"])
    with pytest.raises(ValueError, match="base_response"):
        C.sample_constraints(rng, "12 34", 1)
    assert C.sample_constraints(rng, BASES[0], 0) == []


# ---------------------------------------------------------------------------------------------- compose property


def _assert_composes(base, types, rng):
    cs = [{"type": t, "args": C.CONSTRAINTS[t].sample_args(rng, base)} for t in types]
    rng.shuffle(cs)
    out = C.compose(base, cs)  # compose itself raises if a verdict fails; assert it independently too
    verdicts = [C.CONSTRAINTS[c["type"]].check(out, c["args"]) for c in cs]
    assert all(verdicts), (base, cs, out, verdicts)
    assert all(C.check_response_loose(out, cs)), (base, cs, out)


def test_compose_satisfies_every_compatible_combination_up_to_three():
    rng = random.Random(0)
    combos = [c for k in (1, 2, 3) for c in itertools.combinations(C.CONSTRAINTS, k) if C.compatible(c)]
    assert len(combos) > 300
    for combo in combos:
        for base in BASES:
            _assert_composes(base, combo, rng)


@pytest.mark.parametrize("k", [4, 5])
def test_compose_satisfies_random_combinations_of_four_and_five(k):
    rng = random.Random(k)
    combos = [c for c in itertools.combinations(C.CONSTRAINTS, k) if C.compatible(c)]
    for combo in rng.sample(combos, 150):
        for base in BASES:
            _assert_composes(base, combo, rng)


def test_compose_keeps_content_and_transforms():
    base = BASES[2]
    cs = [{"type": "exclude_keyword", "args": {"word": "very"}}, {"type": "no_commas", "args": {}},
          {"type": "bullet_list", "args": {"n": 3}}, {"type": "title", "args": {}},
          {"type": "end_with", "args": {"phrase": "That is all."}}]
    out = C.compose(base, cs)
    assert out.startswith("<<The Eiffel Tower Is>>\n* The Eiffel Tower is really big and it is known worldwide.\n")
    assert out.endswith("\nThat is all.")
    assert "few climb the stairs!" in out and out.count("\n* ") == 3


def test_compose_rejects_conflicts_and_infeasible_args():
    with pytest.raises(ValueError, match="cannot be combined"):
        C.compose(BASES[0], [{"type": "lowercase", "args": {}}, {"type": "uppercase", "args": {}}])
    with pytest.raises(ValueError, match="fails \\['max_words'\\]"):
        C.compose(BASES[2], [{"type": "max_words", "args": {"n": 5}},
                             {"type": "end_with", "args": {"phrase": "Is there anything else I can help with?"}}])
    # on its own, apply() still meets an infeasible bound (by cutting)
    assert C.CONSTRAINTS["max_words"].check(C.CONSTRAINTS["max_words"].apply(BASES[2], {"n": 5}), {"n": 5})


# ---------------------------------------------------------------------------------------------- loose vs strict


def test_loose_passes_a_chatty_first_line_that_strict_fails():
    cs = [{"type": "start_with", "args": {"phrase": "Here is my answer:"}}]
    response = "Sure, here it is:\nHere is my answer: Paris is the capital of France."
    assert C.check_response(response, cs) == [False]
    assert C.check_response_loose(response, cs) == [True]
    ends = [{"type": "end_with", "args": {"phrase": "That is all."}}, {"type": "bullet_list", "args": {"n": 1}}]
    assert C.check_response("* Paris. That is all.\nLet me know!", ends) == [False, True]
    assert C.check_response_loose("* Paris. That is all.\nLet me know!", ends) == [True, True]
    assert C.check_response_loose("Paris is nice.", cs) == [False]


def test_loose_variants_match_if_verifiable():
    common = pytest.importorskip("if_verifiable.common", reason="if-verifiable is a dev dependency")
    for response in ["a\nb\nc", "single line", "**bold**\n* item\n", "", "x\n"]:
        assert C.loose_variants(response) == common.get_loose_transformations(response)


# ---------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("cid,args,fragment", [
    ("max_words", {}, "missing args \\['n'\\]"),
    ("max_words", {"n": 5, "m": 1}, "unexpected args \\['m'\\]"),
    ("max_words", {"n": "5"}, "'n' must be int"),
    ("max_words", {"n": True}, "'n' must be int"),
    ("min_words", {"n": 0}, "'n' must be >= 1"),
    ("num_sentences", {"relation": "roughly", "n": 2}, "'relation' must be one of"),
    ("postscript", {"marker": "PS"}, "'marker' must be one of"),
    ("exclude_keyword", {"word": "banana"}, "'word' must be one of"),
    ("include_keywords", {"keywords": ["a", "b", "c"]}, "'keywords'"),
    ("include_keywords", {"keywords": ["two words"]}, "'keywords'"),
    ("start_with", {"phrase": " "}, "'phrase'"),
    ("lowercase", {"x": 1}, "unexpected args \\['x'\\]"),
])
def test_bad_args_raise_naming_the_arg(cid, args, fragment):
    c = [{"type": cid, "args": args}]
    for call in (lambda: C.check_response("Text.", c), lambda: C.compose("Text.", c),
                 lambda: C.describe_all(c, random.Random(0), heldout=False)):
        with pytest.raises(ValueError, match=fragment):
            call()


def test_unknown_type_raises_naming_valid_types():
    bad = [{"type": "shouting", "args": {}}]
    for call in (lambda: C.check_response("x", bad), lambda: C.check_response_loose("x", bad),
                 lambda: C.compose("x", bad), lambda: C.compatible(["shouting"])):
        with pytest.raises(ValueError, match="unknown constraint type 'shouting'; valid types: .*lowercase"):
            call()
    with pytest.raises(ValueError, match="'type'"):
        C.check_response("x", [{"kind": "lowercase"}])


# ---------------------------------------------------------------------------------------------- IFEval agreement


def _ifeval_checker(instructions, cid, args):
    """IFEval's reference checker for our type and args, or None where IFEval has no counterpart."""
    made = {
        "lowercase": lambda: (instructions.LowercaseLettersEnglishChecker("change_case:english_lowercase"), {}),
        "uppercase": lambda: (instructions.CapitalLettersEnglishChecker("change_case:english_capital"), {}),
        "no_commas": lambda: (instructions.CommaChecker("punctuation:no_comma"), {}),
        "json_format": lambda: (instructions.JsonFormat("detectable_format:json_format"), {}),
        "quotation": lambda: (instructions.QuotationChecker("startend:quotation"), {}),
        "title": lambda: (instructions.TitleChecker("detectable_format:title"), {}),
        "end_with": lambda: (instructions.EndChecker("startend:end_checker"), {"end_phrase": args.get("phrase")}),
        "postscript": lambda: (instructions.PostscriptChecker("detectable_content:postscript"),
                               {"postscript_marker": {"P.S.": "P.S.", "P.P.S.": "P.P.S"}.get(args.get("marker"))}),
        "bullet_list": lambda: (instructions.BulletListChecker("detectable_format:number_bullet_lists"),
                                {"num_bullets": args.get("n")}),
        "include_keywords": lambda: (instructions.KeywordChecker("keywords:existence"),
                                     {"keywords": args.get("keywords")}),
        "exclude_keyword": lambda: (instructions.ForbiddenWords("keywords:forbidden_words"),
                                    {"forbidden_words": [args.get("word")]}),
        # ours is "at most n" = IFEval's "less than n + 1"
        "max_words": lambda: (instructions.NumberOfWords("length_constraints:number_words"),
                              {"num_words": args.get("n", 0) + 1, "relation": "less than"}),
        "min_words": lambda: (instructions.NumberOfWords("length_constraints:number_words"),
                              {"num_words": args.get("n"), "relation": "at least"}),
    }
    if cid not in made:
        return None
    checker, kwargs = made[cid]()
    checker.build_description(**kwargs)
    return checker


# Rows where our checker deliberately differs from IFEval's (see the module docstring): (type, response, args,
# ours, IFEval's).
KNOWN_DIFFERENCES = [
    ("include_keywords", "Prehistory is long.", {"keywords": ["history"]}, False, True),  # substring match there
    ("postscript", "Read the p.s. below.", {"marker": "P.S."}, False, True),  # marker anywhere there
    ("postscript", "Body.\nP.P.S. More.", {"marker": "P.S."}, False, True),  # "p.s." inside "p.p.s." there
    ("lowercase", "c'est la vie, mon ami, et nous sommes tous tres heureux ici ensemble.", {}, True, False),  # lang
]


@pytest.fixture(scope="module")
def ifeval():
    instructions = _ifeval_instructions()
    import langdetect  # IFEval's case checkers call langdetect, which is random unless seeded

    langdetect.DetectorFactory.seed = 0
    return instructions


def test_checkers_agree_with_ifeval_on_the_table(ifeval):
    compared = set()
    for cid, rows in TABLE.items():
        for response, args, expected in rows:
            ref = _ifeval_checker(ifeval, cid, args)
            if ref is None:
                continue
            if not response.strip():  # IFEval's evaluation fails empty responses before asking the checker
                continue
            assert ref.check_following(response) is expected, (cid, response, args)
            compared.add(cid)
    # start_with: IFEval's registry has no counterpart (its multi-turn constrained_start is disabled there)
    assert compared == set(C.CONSTRAINTS) - {"num_sentences", "start_with"}


def test_known_differences_from_ifeval_are_what_the_docstring_says(ifeval):
    for cid, response, args, ours, theirs in KNOWN_DIFFERENCES:
        assert C.CONSTRAINTS[cid].check(response, args) is ours, (cid, response)
        assert bool(_ifeval_checker(ifeval, cid, args).check_following(response)) is theirs, (cid, response)


def test_composed_responses_pass_ifeval_checkers(ifeval):
    """SFT targets and suite references built by compose() are accepted by IFEval's reference checkers too.

    Not compared: the case checkers (langdetect misjudges one-line texts), start_with and num_sentences (no
    counterpart that runs offline)."""
    rng = random.Random(11)
    skip = {"lowercase", "uppercase", "start_with", "num_sentences"}
    fives = [c for c in itertools.combinations(C.CONSTRAINTS, 5) if C.compatible(c)]
    for combo in rng.sample(fives, 80):
        base = rng.choice(BASES)
        cs = C.sample_constraints(rng, base, 5, types=combo)
        out = C.compose(base, cs)
        for c in cs:
            if c["type"] not in skip:
                assert _ifeval_checker(ifeval, c["type"], c["args"]).check_following(out), (c, out)


def test_num_sentences_agrees_with_ifeval(ifeval):
    import nltk

    try:
        nltk.data.find("tokenizers/punkt")
    except LookupError:
        pytest.skip("IFEval's length_constraints:number_sentences needs nltk's punkt data, which is not downloaded "
                    "(offline); our num_sentences uses its own splitter")
    for response, args, expected in TABLE["num_sentences"]:
        ref = ifeval.NumberOfSentences("length_constraints:number_sentences")
        relation, n = ("at least", args["n"]) if args["relation"] == "at least" else ("less than", args["n"] + 1)
        ref.build_description(num_sentences=n, relation=relation)
        assert ref.check_following(response) is expected, response
