"""Verifiable instruction constraints (IFEval / FollowBench style).

One class per instruction, following IFEval's shape (Zhou et al. 2023, "Instruction-Following Evaluation for Large
Language Models", google-research/instruction_following_eval): each class words its instruction (`describe`),
checks a response (`check`) and, because stage 01 builds SFT targets and reference answers from plain base
responses, also turns a response into one that satisfies it (`apply`). All classes are listed in `CONSTRAINTS`.

A constraint instance in data is `{"type": <id>, "args": {...}}` with JSON-serialisable args.

Where a checker deliberately differs from IFEval's reference checker (tests/test_constraints.py runs both):
- lowercase / uppercase: no language detection (IFEval also requires langdetect to say English); all our responses
  are English and langdetect is noisy on short texts.
- include_keywords: whole-word match; IFEval's `keywords:existence` matches substrings ("art" in "start").
- postscript: the marker must begin a line; IFEval accepts it anywhere ("... see p.s. below" passes there), and its
  "P.S." pattern also fires on a "P.P.S." line.
- start_with: the whole response must start with the phrase; IFEval's multi-turn `constrained_start` (not in its
  registry) accepts the phrase at the start of any line.
- num_sentences: a small rule-based splitter (`split_sentences`) instead of nltk punkt, so no data download; and
  an "exactly" relation beside IFEval's "at least"/"less than" (binding exact counts for the learnable tier).

`binding_args` gives arguments a plain answer does not already meet (a word limit below its length, an exact
sentence count it lacks, a word it contains to exclude), so a reply that ignores the instruction fails it;
`sample_binding_constraints` draws sets in which every constraint binds.
"""

from __future__ import annotations

import abc
import functools
import itertools
import json
import random
import re
import zlib
from typing import Iterable, Sequence

# ----------------------------------------------------------------------------------------------------------------
# Vocabularies. Every word a constraint may add to a response (phrases, keyword sentence, postscript notes,
# fillers, the JSON key) stays clear of `EXCLUDABLE_WORDS` and of commas, so no constraint undoes another; the
# tests check that.

START_PHRASES = ("Here is my answer:", "Happy to help.", "Sure thing.", "Let me explain.", "Here is what I know:")
END_PHRASES = ("Any other questions?", "Is there anything else I can help with?", "That is all.",
               "Hope this helps.", "Let me know if you need more.")
KEYWORDS = ("history", "context", "evidence", "research", "culture", "nature", "science", "travel", "language",
            "geography", "community", "tradition")
# word -> single-word synonym that fits the same slot (same article: a/an), so removing the word keeps the text
EXCLUDABLE_WORDS = {
    "very": "really", "big": "large", "small": "little", "many": "numerous", "important": "essential",
    "often": "frequently", "usually": "typically", "quickly": "rapidly", "good": "fine", "great": "major",
    "because": "since", "however": "nevertheless", "known": "famous", "main": "chief", "begin": "start",
}
POSTSCRIPT_MARKERS = ("P.S.", "P.P.S.")
POSTSCRIPT_NOTES = ("I hope this helps.", "Feel free to ask a follow-up question.", "Thanks for reading.")
FILLER_SENTENCE = "There is more to say on this topic."
JSON_KEY = "response"

# A response with `max_words` picked as base length + this slack still fits after every other constraint added its
# words: keyword sentence (<= 7), title (<= 4), start phrase (<= 5), postscript (<= 3 + 8) or end phrase (<= 8), JSON
# key (1); each newline JSON-escapes to "\n", which can add one \w+ token, so the newline count is added on top.
MAX_WORDS_SLACK = 40
# Likewise for "at most N sentences": keyword sentence, start phrase, end phrase or postscript add <= 1 each.
MAX_SENTENCES_SLACK = 4
MAX_BULLETS = 5

_WORD = re.compile(r"\w+")  # IFEval's count_words: nltk RegexpTokenizer(r"\w+")
_SENTENCE_END = re.compile(r"[.!?]+[\"'\u201d\u2019)\]]*(?=\s|$)")
# A period after these does not end a sentence ("Dr. Venn", "e.g. this", "P.S. thanks").
_ABBREVIATIONS = frozenset({"mr", "mrs", "ms", "dr", "prof", "st", "jr", "sr", "vs", "e.g", "i.e", "p.s", "p.p.s"})
# IFEval's bullet regexes (detectable_format:number_bullet_lists): "*" not followed by "*", or "-", at line start.
_STAR_BULLET = re.compile(r"^\s*\*[^\*].*$", re.MULTILINE)
_DASH_BULLET = re.compile(r"^\s*-.*$", re.MULTILINE)
_LIST_MARKER = re.compile(r"^\s*(?:[*\-+\u2022]|\d+[.)])\s+")


def count_words(text: str) -> int:
    """Words as IFEval counts them: runs of \\w characters."""
    return len(_WORD.findall(text))


def split_sentences(text: str) -> list[str]:
    """Sentences ending in . ! or ? (optionally followed by closing quotes/brackets) before whitespace or the end.

    Newlines alone do not end a sentence, so a title line or a bullet without punctuation joins the next sentence;
    trailing text without end punctuation counts as one more sentence if it has a word in it.
    """
    sentences, start = [], 0
    for m in _SENTENCE_END.finditer(text):
        before = re.search(r"(^|\s)(\S+)$", text[start:m.start()])
        token = before.group(2).lower().lstrip("\"'(") if before else ""
        line_start = before is not None and re.search(r"(^|\n)[ \t]*$", text[:start + before.start(2)]) is not None
        if m.group(0).startswith(".") and not m.group(0).startswith("..") and (
                token in _ABBREVIATIONS or (len(token) == 1 and token.isalpha())
                or (token.isdigit() and line_start)):  # "2. second step": a list number, not a sentence
            continue
        piece = text[start:m.end()].strip()
        if _WORD.search(piece):
            sentences.append(piece)
        start = m.end()
    rest = text[start:].strip()
    if _WORD.search(rest):
        sentences.append(rest)
    return sentences


def count_sentences(text: str) -> int:
    return len(split_sentences(text))


def _is_bullet_line(line: str) -> bool:
    return bool(_STAR_BULLET.match(line) or _DASH_BULLET.match(line))


def _strip_list_markers(text: str) -> str:
    return "\n".join(_LIST_MARKER.sub("", line) for line in text.split("\n"))


def _end_sentence(text: str) -> str:
    """`text` with end punctuation, so that a sentence appended after it stays a sentence of its own."""
    text = text.rstrip()
    if not text or text[-1] in ".!?:;\"')]\u201d\u2019" or _is_bullet_line(text.split("\n")[-1]):
        return text
    return text + "."


def _append_sentence(text: str, sentence: str) -> str:
    text = _end_sentence(text)
    return f"{text} {sentence}" if text else sentence


def _has_word(text: str, word: str) -> bool:
    return re.search(rf"\b{re.escape(word)}\b", text, flags=re.IGNORECASE) is not None


class Constraint(abc.ABC):
    """A verifiable instruction: words it, checks a response, and makes a response satisfy it.

    Subclasses set `id`, `conflicts` (ids it cannot be combined with), `arg_types` (arg name -> type),
    `train_phrasings` (wordings used in SFT data) and `heldout_phrasings` (different wordings, used only in the
    evaluation suite); phrasings are format strings over `wording_fields(args)`.
    """

    id: str = ""
    conflicts: frozenset[str] = frozenset()
    arg_types: dict[str, type] = {}
    train_phrasings: tuple[str, ...] = ()
    heldout_phrasings: tuple[str, ...] = ()
    # Cue words of the opposite instruction: a phrasing holding one ("Do not use any capital letters" for
    # lowercase) is a negation trap, left out where the phrasing should test following, not parsing negation.
    trap_words: tuple[str, ...] = ()
    # apply() adds words to the response: a word limit that binds cannot be met beside such an instruction.
    adds_words: bool = False

    def validate(self, args: dict) -> None:
        """Raise ValueError naming the bad arg if `args` does not fit this constraint."""
        if not isinstance(args, dict):
            raise ValueError(f"{self.id}: args must be a dict with keys {sorted(self.arg_types)}, got {args!r}")
        missing = sorted(set(self.arg_types) - set(args))
        extra = sorted(set(args) - set(self.arg_types))
        if missing or extra:
            raise ValueError(f"{self.id}: missing args {missing}, unexpected args {extra}; "
                             f"expected exactly {sorted(self.arg_types)}")
        for name, kind in self.arg_types.items():
            value = args[name]
            # bool is an int subclass; a count given as True is a mistake, not 1
            if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
                raise ValueError(f"{self.id}: arg {name!r} must be {kind.__name__}, got {value!r}")
        self._validate_values(args)

    def _validate_values(self, args: dict) -> None:
        """Range and vocabulary checks beyond the types; subclasses with args override."""

    def sample_args(self, rng: random.Random, base_response: str) -> dict:
        return {}

    def binding_args(self, rng: random.Random, base_response: str) -> dict | None:
        """Args that bind: the plain `base_response` does not satisfy them (a reply that ignores the instruction
        fails it) and `apply` can meet them; None when this response allows none."""
        args = self.sample_args(rng, base_response)
        return None if self.check(base_response, args) else args

    def wording_fields(self, args: dict) -> dict:
        return dict(args)

    def phrasings(self, heldout: bool = False, avoid_traps: bool = False) -> tuple[str, ...]:
        pool = self.heldout_phrasings if heldout else self.train_phrasings
        if avoid_traps:
            pool = tuple(p for p in pool if not any(w in p.lower() for w in self.trap_words))
        return pool

    def describe(self, args: dict, rng: random.Random, heldout: bool = False, avoid_traps: bool = False) -> str:
        self.validate(args)
        return rng.choice(self.phrasings(heldout, avoid_traps)).format(**self.wording_fields(args))

    @abc.abstractmethod
    def apply(self, response: str, args: dict) -> str:
        """`response` changed as little as possible so that it satisfies this constraint, content kept."""

    @abc.abstractmethod
    def check(self, response: str, args: dict) -> bool:
        """Strict verdict: does `response` follow the instruction?"""


def _positive(constraint_id: str, args: dict, name: str, upper: int | None = None) -> None:
    value = args[name]
    if value < 1 or (upper is not None and value > upper):
        bound = f"1..{upper}" if upper is not None else ">= 1"
        raise ValueError(f"{constraint_id}: arg {name!r} must be {bound}, got {value}")


def _plural(n: int, noun: str) -> str:
    return noun if n == 1 else noun + "s"


def _phrase(constraint_id: str, args: dict) -> None:
    phrase = args["phrase"]
    if not phrase.strip() or "\n" in phrase or phrase != phrase.strip():
        raise ValueError(f"{constraint_id}: arg 'phrase' must be a non-empty one-line phrase without surrounding "
                         f"spaces, got {phrase!r}")


# ------------------------------------------------------------------------------------------------ case


class Lowercase(Constraint):
    id = "lowercase"
    conflicts = frozenset({"uppercase"})
    trap_words = ("capital", "upper")
    train_phrasings = ("Write your entire answer in lowercase letters only.",
                       "Do not use any capital letters in your response.",
                       "Your whole reply must be in lowercase.")
    heldout_phrasings = ("Every letter of your reply should be a small letter; capitals are not allowed.",
                         "Respond using no uppercase characters at all.")

    def apply(self, response, args):
        return response.lower()

    def check(self, response, args):
        return response.islower()


class Uppercase(Constraint):
    id = "uppercase"
    # json_format: its key "response" is lowercase.
    conflicts = frozenset({"lowercase", "json_format"})
    trap_words = ("lower", "small")
    train_phrasings = ("Write your entire answer in capital letters only.",
                       "Your whole response must be in uppercase.",
                       "Use only capital letters in your reply.")
    heldout_phrasings = ("Every letter of your reply should be a capital; lowercase is not allowed.",
                         "Respond in ALL CAPS from start to finish.")

    def apply(self, response, args):
        return response.upper()

    def check(self, response, args):
        return response.isupper()


# ------------------------------------------------------------------------------------------------ start / end


class StartWith(Constraint):
    id = "start_with"
    adds_words = True
    # title: its line comes first; json_format: the response would start with "{".
    conflicts = frozenset({"title", "json_format"})
    arg_types = {"phrase": str}
    train_phrasings = ("Start your answer with the exact phrase \"{phrase}\" and nothing before it.",
                       "Begin your response with \"{phrase}\" as its first words.",
                       "The first words of your reply must be \"{phrase}\" exactly.")
    heldout_phrasings = ("Open with these exact words and nothing before them: \"{phrase}\"",
                         "Let \"{phrase}\" be the very beginning of what you write.")

    def _validate_values(self, args):
        _phrase(self.id, args)

    def sample_args(self, rng, base_response):
        return {"phrase": rng.choice(START_PHRASES)}

    def apply(self, response, args):
        if self.check(response, args):
            return response
        text = response.strip()
        # a bullet must stay at the start of its own line, so the phrase gets a line of its own there
        sep = "\n" if _is_bullet_line(text.split("\n")[0]) else " "
        return f"{args['phrase']}{sep}{text}"

    def check(self, response, args):
        # case-insensitive like IFEval's end checker; an opening quote may come first (quotation wraps it)
        return response.strip().lstrip('"').lstrip().lower().startswith(args["phrase"].lower())


class EndWith(Constraint):
    id = "end_with"
    adds_words = True
    # postscript: it must come last too; json_format: the response would end with "}".
    conflicts = frozenset({"postscript", "json_format"})
    arg_types = {"phrase": str}
    train_phrasings = ("End your answer with the exact phrase \"{phrase}\" and nothing after it.",
                       "Finish your response with \"{phrase}\" and write nothing after it.",
                       "The last words of your reply must be \"{phrase}\" exactly.")
    heldout_phrasings = ("Close with these exact words and nothing after them: \"{phrase}\"",
                         "Let \"{phrase}\" be the very end of what you write.")

    def _validate_values(self, args):
        _phrase(self.id, args)

    def sample_args(self, rng, base_response):
        return {"phrase": rng.choice(END_PHRASES)}

    def apply(self, response, args):
        if self.check(response, args):
            return response
        text = response.strip()
        if _is_bullet_line(text.split("\n")[-1]):  # keep the phrase out of the last bullet
            return f"{text}\n{args['phrase']}"
        return _append_sentence(text, args["phrase"])

    def check(self, response, args):
        # IFEval startend:end_checker, exactly
        return response.strip().strip('"').lower().endswith(args["phrase"].strip().lower())


# ------------------------------------------------------------------------------------------------ keywords


class IncludeKeywords(Constraint):
    id = "include_keywords"
    adds_words = True
    arg_types = {"keywords": list}
    train_phrasings = ("Include the {noun} {keywords} in your answer.",
                       "Your response must mention the {noun} {keywords}.",
                       "Make sure to use the {noun} {keywords} somewhere in your reply.")
    heldout_phrasings = ("Work the {noun} {keywords} into what you write.",
                         "Somewhere in the reply, the {noun} {keywords} should appear.")

    def _validate_values(self, args):
        kws = args["keywords"]
        if not 1 <= len(kws) <= 2 or len(set(kws)) != len(kws) or not all(
                isinstance(k, str) and _WORD.fullmatch(k) for k in kws):
            raise ValueError(f"{self.id}: arg 'keywords' must be a list of 1-2 distinct single words, got {kws!r}")

    def sample_args(self, rng, base_response):
        # keywords the base does not already contain (not even inside a longer word), so the constraint bites
        absent = [k for k in KEYWORDS if k not in base_response.lower()]
        pool = absent if len(absent) >= 2 else list(KEYWORDS)
        return {"keywords": rng.sample(pool, rng.randint(1, 2))}

    def wording_fields(self, args):
        quoted = [f"'{k}'" for k in args["keywords"]]
        return {"noun": "keyword" if len(quoted) == 1 else "keywords", "keywords": " and ".join(quoted)}

    def apply(self, response, args):
        missing = [k for k in args["keywords"] if not _has_word(response, k)]
        if not missing:
            return response
        return _append_sentence(response, f"This answer touches on {' and '.join(missing)}.")

    def check(self, response, args):
        return all(_has_word(response, k) for k in args["keywords"])


class ExcludeKeyword(Constraint):
    id = "exclude_keyword"
    arg_types = {"word": str}
    train_phrasings = ("Do not use the word '{word}' in your answer.",
                       "Avoid the word '{word}' in your response.",
                       "Your reply must not contain the word '{word}'.")
    heldout_phrasings = ("Write '{word}' nowhere in what you say.",
                         "The word '{word}' is off limits for this reply.")

    def _validate_values(self, args):
        if args["word"] not in EXCLUDABLE_WORDS:
            raise ValueError(f"{self.id}: arg 'word' must be one of {sorted(EXCLUDABLE_WORDS)} (words apply() can "
                             f"replace by a synonym), got {args['word']!r}")

    def sample_args(self, rng, base_response):
        # prefer a word the base uses, so apply() has something to replace and the constraint bites
        present = [w for w in EXCLUDABLE_WORDS if _has_word(base_response, w)]
        return {"word": rng.choice(present or list(EXCLUDABLE_WORDS))}

    def binding_args(self, rng, base_response):
        present = [w for w in EXCLUDABLE_WORDS if _has_word(base_response, w)]
        return {"word": rng.choice(present)} if present else None

    def apply(self, response, args):
        synonym = EXCLUDABLE_WORDS[args["word"]]

        def same_case(m: re.Match) -> str:
            w = m.group(0)
            if w.isupper() and len(w) > 1:
                return synonym.upper()
            return synonym.capitalize() if w[0].isupper() else synonym

        return re.sub(rf"\b{re.escape(args['word'])}\b", same_case, response, flags=re.IGNORECASE)

    def check(self, response, args):
        return not _has_word(response, args["word"])  # IFEval keywords:forbidden_words


class NoCommas(Constraint):
    id = "no_commas"
    train_phrasings = ("Do not use any commas in your answer.",
                       "Your response must not contain a single comma.",
                       "Write your reply without commas.")
    heldout_phrasings = ("Commas are forbidden anywhere in what you write.",
                         "Leave out every comma from the reply.")

    def binding_args(self, rng, base_response):
        return {} if "," in base_response else None

    def apply(self, response, args):
        text = re.sub(r"(?<=\d),(?=\d{3}\b)", "", response)  # 1,000 -> 1000
        text = re.sub(r",(?=\s)", "", text)  # "a, b" -> "a b"
        return text.replace(",", " ")

    def check(self, response, args):
        return "," not in response


# ------------------------------------------------------------------------------------------------ length


class MaxWords(Constraint):
    id = "max_words"
    arg_types = {"n": int}
    train_phrasings = ("Answer in at most {n} {words}.",
                       "Keep your response to {n} {words} or fewer.",
                       "Your reply must not be longer than {n} {words}.")
    heldout_phrasings = ("Use no more than {n} {words} in total.",
                         "The reply has a limit of {n} {words}; do not exceed it.")

    def _validate_values(self, args):
        _positive(self.id, args, "n")

    def wording_fields(self, args):
        return {"n": args["n"], "words": _plural(args["n"], "word")}

    def sample_args(self, rng, base_response):
        floor = count_words(base_response) + MAX_WORDS_SLACK + base_response.count("\n") + rng.randint(0, 20)
        return {"n": -(-floor // 10) * 10}  # round up to a round number, as a person would ask

    def binding_args(self, rng, base_response):
        # a limit below the plain answer's length: the reply must be cut (apply keeps the first n words)
        have = count_words(base_response)
        return {"n": rng.randint(max(3, have // 2), have - 2)} if have >= 6 else None

    def apply(self, response, args):
        words = list(_WORD.finditer(response))
        if len(words) <= args["n"]:
            return response
        # only reached with args too tight for the response: keep the first n words
        return _end_sentence(response[:words[args["n"] - 1].end()])

    def check(self, response, args):
        return count_words(response) <= args["n"]


class MinWords(Constraint):
    id = "min_words"
    adds_words = True
    arg_types = {"n": int}
    train_phrasings = ("Answer in at least {n} {words}.",
                       "Your response must be {n} {words} or longer.",
                       "Write no fewer than {n} {words}.")
    heldout_phrasings = ("The reply should run to {n} {words} or more.",
                         "Make what you write contain a minimum of {n} {words}.")

    def _validate_values(self, args):
        _positive(self.id, args, "n")

    def wording_fields(self, args):
        return {"n": args["n"], "words": _plural(args["n"], "word")}

    def sample_args(self, rng, base_response):
        # count what no other constraint removes: no_commas makes "1,000" (two \w+ words) "1000" (one), and
        # bullet_list drops list numbers ("1. ")
        top = max(1, count_words(NoCommas().apply(_strip_list_markers(base_response), {})))
        n = rng.randint(max(1, top // 2), top)
        return {"n": n // 5 * 5 if n >= 5 else n}

    def binding_args(self, rng, base_response):
        # more words than the plain answer has: the reply must say more (apply adds a sentence)
        return {"n": count_words(base_response) + rng.randint(4, 12)}

    def apply(self, response, args):
        text = response
        while count_words(text) < args["n"]:  # only with args too large for the response
            text = _append_sentence(text, FILLER_SENTENCE)
        return text

    def check(self, response, args):
        return count_words(response) >= args["n"]


class NumSentences(Constraint):
    id = "num_sentences"
    adds_words = True
    # json_format: JSON escapes newlines to "\n", which can glue two sentences together for the splitter.
    conflicts = frozenset({"json_format"})
    arg_types = {"relation": str, "n": int}
    relations = ("at least", "at most", "exactly")
    train_phrasings = ("Your answer must contain {relation} {n} {sentences}.",
                       "Write {relation} {n} {sentences}.",
                       "Use {relation} {n} {sentences} in your response.")
    heldout_phrasings = ("The number of sentences in the reply should be {relation} {n}.",
                         "Compose a reply of {relation} {n} {sentences}.")

    def wording_fields(self, args):
        return {**args, "sentences": _plural(args["n"], "sentence")}

    def _validate_values(self, args):
        if args["relation"] not in self.relations:
            raise ValueError(f"{self.id}: arg 'relation' must be one of {self.relations}, got {args['relation']!r}")
        _positive(self.id, args, "n")

    def sample_args(self, rng, base_response):
        # bullet_list drops list numbers, which can change the count ("1. !" is a sentence to the splitter)
        counts = (count_sentences(base_response), count_sentences(_strip_list_markers(base_response)))
        if rng.random() < 0.5:
            return {"relation": "at least", "n": rng.randint(1, max(1, min(counts)))}
        return {"relation": "at most", "n": max(counts) + MAX_SENTENCES_SLACK + rng.randint(0, 3)}

    def binding_args(self, rng, base_response):
        # an exact count the plain answer does not have: sentences must be cut or added
        have = count_sentences(base_response)
        return {"relation": "exactly", "n": rng.choice([n for n in range(1, have + 3) if n != have])}

    def apply(self, response, args):
        if self.check(response, args):
            return response
        # only with args that do not fit the response
        if args["relation"] in ("at most", "exactly") and count_sentences(response) > args["n"]:
            return " ".join(split_sentences(response)[:args["n"]])
        text = response
        while count_sentences(text) < args["n"]:
            text = _append_sentence(text, FILLER_SENTENCE)
        return text

    def check(self, response, args):
        have = count_sentences(response)
        if args["relation"] == "exactly":
            return have == args["n"]
        return have >= args["n"] if args["relation"] == "at least" else have <= args["n"]


# ------------------------------------------------------------------------------------------------ format


class BulletList(Constraint):
    id = "bullet_list"
    # json_format: bullets are lines, and JSON escapes the newlines
    conflicts = frozenset({"json_format"})
    arg_types = {"n": int}
    train_phrasings = ("Format your answer as exactly {n} markdown {bullet_points}, each starting with \"* \".",
                       "Your response must be a list of exactly {n} {bullet_points} using \"* \".",
                       "Answer with exactly {n} markdown {bullets} such as \"* first point\".")
    heldout_phrasings = ("Lay the reply out as {n} \"* \" bullet {lines}, no more and no fewer.",
                         "Give precisely {n} {points}, each on its own line beginning with \"* \".")

    def _validate_values(self, args):
        _positive(self.id, args, "n", upper=20)

    def wording_fields(self, args):
        n = args["n"]
        return {"n": n, "bullet_points": _plural(n, "bullet point"), "bullets": _plural(n, "bullet"),
                "lines": _plural(n, "line"), "points": _plural(n, "point")}

    def sample_args(self, rng, base_response):
        # one bullet per sentence group: no more bullets than the base has sentences once list numbers are gone
        have = count_sentences(_strip_list_markers(base_response))
        return {"n": rng.randint(2, min(MAX_BULLETS, have)) if have >= 2 else 1}

    def apply(self, response, args):
        n = args["n"]
        units = split_sentences(" ".join(_strip_list_markers(response).split()))
        while len(units) < n:  # fewer sentences than bullets: split the longest at a word boundary
            i = max(range(len(units)), key=lambda k: len(units[k].split())) if units else 0
            words = units[i].split() if units else []
            if len(words) < 2:
                raise ValueError(f"{self.id}: cannot make {n} bullets from a response this short: {response!r}")
            units[i:i + 1] = [" ".join(words[:len(words) // 2]), " ".join(words[len(words) // 2:])]
        groups, start = [], 0
        for i in range(n):  # contiguous groups, sizes differing by at most one
            size = len(units) // n + (1 if i < len(units) % n else 0)
            groups.append(" ".join(units[start:start + size]))
            start += size
        return "\n".join(f"* {g}" for g in groups)

    def check(self, response, args):
        # IFEval detectable_format:number_bullet_lists, exactly ("*" and "-" lines both count)
        return len(_STAR_BULLET.findall(response)) + len(_DASH_BULLET.findall(response)) == args["n"]


class JsonFormat(Constraint):
    id = "json_format"
    adds_words = True
    conflicts = frozenset({"uppercase", "start_with", "end_with", "num_sentences", "bullet_list", "quotation",
                           "title", "postscript"})
    train_phrasings = ("Wrap your entire answer in JSON format.",
                       "Your whole response must be valid JSON.",
                       "Reply with a JSON object and nothing else.")
    heldout_phrasings = ("Output only machine-readable JSON; no text outside it.",
                         "The reply, in full, has to parse as JSON.")

    def apply(self, response, args):
        if self.check(response, args):
            return response
        # ensure_ascii=False: "\u00e9"-style escapes would add \w+ tokens ("u00e9") to the word count
        return json.dumps({JSON_KEY: response.strip()}, ensure_ascii=False)

    def check(self, response, args):
        # IFEval detectable_format:json_format, exactly (markdown code fences allowed)
        value = (response.strip().removeprefix("```json").removeprefix("```Json").removeprefix("```JSON")
                 .removeprefix("```").removesuffix("```").strip())
        try:
            json.loads(value)
        except ValueError:
            return False
        return True


class Quotation(Constraint):
    id = "quotation"
    conflicts = frozenset({"json_format"})
    train_phrasings = ("Wrap your entire answer in double quotation marks.",
                       "Put your whole response inside double quotes.",
                       "Enclose your reply in double quotation marks.")
    heldout_phrasings = ("Begin and end what you write with a \" character, around everything.",
                         "The reply as a whole should sit between two double quotes.")

    def apply(self, response, args):
        if self.check(response, args):
            return response
        text = response.strip()
        # a quote glued to a leading "* " would stop that line from being a bullet
        opening = '"\n' if _is_bullet_line(text.split("\n")[0]) else '"'
        return f'{opening}{text}"'

    def check(self, response, args):
        value = response.strip()  # IFEval startend:quotation, exactly
        return len(value) > 1 and value[0] == '"' and value[-1] == '"'


class Title(Constraint):
    id = "title"
    adds_words = True
    conflicts = frozenset({"start_with", "json_format"})
    train_phrasings = ("Give your answer a title wrapped in double angular brackets, such as <<my title>>.",
                       "Your response must include a title in double angular brackets, like <<title>>.",
                       "Start with a title inside << and >>.")
    heldout_phrasings = ("Put a heading between << and >> at the top of the reply.",
                         "Name your reply with a title enclosed as <<like this>>.")

    def apply(self, response, args):
        if self.check(response, args):
            return response
        text = response.strip()
        words = re.findall(r"[^\W_]+", text)[:4] or ["Answer"]
        title = " ".join(w[:1].upper() + w[1:] for w in words)
        return f"<<{title}>>\n{text}"

    def check(self, response, args):
        # IFEval detectable_format:title, exactly: some <<...>> on one line with non-blank content
        return any(t.lstrip("<").rstrip(">").strip() for t in re.findall(r"<<[^\n]+>>", response))


class Postscript(Constraint):
    id = "postscript"
    adds_words = True
    conflicts = frozenset({"end_with", "json_format"})
    arg_types = {"marker": str}
    train_phrasings = ("At the end of your answer, add a postscript starting with {marker}",
                       "Finish your response with a postscript that begins with {marker}",
                       "Add a postscript starting with {marker} after your answer.")
    heldout_phrasings = ("Close the reply with an afterthought introduced by {marker}",
                         "Tack on a note at the bottom that opens with {marker}")

    def _validate_values(self, args):
        if args["marker"] not in POSTSCRIPT_MARKERS:
            raise ValueError(f"{self.id}: arg 'marker' must be one of {POSTSCRIPT_MARKERS}, got {args['marker']!r}")

    def sample_args(self, rng, base_response):
        return {"marker": rng.choice(POSTSCRIPT_MARKERS)}

    def _pattern(self, marker: str) -> re.Pattern:
        # IFEval's patterns, anchored at a line start: "p. s." with optional spaces, final dot required for P.S.
        # and optional for P.P.S. (IFEval's marker there is "P.P.S")
        letters = [re.escape(c) for c in marker.rstrip(".").split(".")]
        final_dot = r"\." if marker == "P.S." else r"\.?"
        return re.compile(r"^\s*[\"']?" + r"\.\s?".join(letters) + final_dot, flags=re.MULTILINE | re.IGNORECASE)

    def apply(self, response, args):
        if self.check(response, args):
            return response
        # the note is picked from the response itself, so apply() stays a pure function of its inputs
        note = POSTSCRIPT_NOTES[zlib.crc32(response.encode()) % len(POSTSCRIPT_NOTES)]
        return f"{response.rstrip()}\n\n{args['marker']} {note}"

    def check(self, response, args):
        return self._pattern(args["marker"]).search(response) is not None


# ------------------------------------------------------------------------------------------------ registry

CONSTRAINTS: dict[str, Constraint] = {c.id: c for c in (
    Lowercase(), Uppercase(), StartWith(), EndWith(), IncludeKeywords(), ExcludeKeyword(), NoCommas(), MaxWords(),
    MinWords(), NumSentences(), BulletList(), JsonFormat(), Quotation(), Title(), Postscript(),
)}

# Edits inside the text first, wrappers last, so no step undoes an earlier one:
# - exclude_keyword and no_commas edit words already there; every later step adds only words that avoid both.
# - length fallbacks (identity for sampled args) before anything is added, so a fallback cut never drops a phrase;
#   the words added afterwards are what MAX_WORDS_SLACK / MAX_SENTENCES_SLACK budget for.
# - include_keywords adds a sentence to the body, before bullet_list regroups the body's sentences into bullets.
# - title, start/end phrases and the postscript go around the body, outside the bullets.
# - case after all text is in place (every other checker ignores case), so added phrases are cased too.
# - quotation and json_format wrap the finished text; JSON last, so nothing edits inside its string.
APPLY_ORDER: tuple[str, ...] = (
    "exclude_keyword", "no_commas", "max_words", "min_words", "num_sentences", "include_keywords", "bullet_list",
    "title", "start_with", "end_with", "postscript", "lowercase", "uppercase", "quotation", "json_format",
)


def get_constraint(constraint_type: str) -> Constraint:
    if constraint_type not in CONSTRAINTS:
        raise ValueError(f"unknown constraint type {constraint_type!r}; valid types: {sorted(CONSTRAINTS)}")
    return CONSTRAINTS[constraint_type]


def _validated(constraints: list[dict]) -> list[tuple[Constraint, dict]]:
    out = []
    for c in constraints:
        if not isinstance(c, dict) or set(c) != {"type", "args"}:
            raise ValueError(f"a constraint must be a dict {{'type': ..., 'args': {{...}}}}, got {c!r}")
        constraint = get_constraint(c["type"])
        constraint.validate(c["args"])
        out.append((constraint, c["args"]))
    return out


def compatible(ids: Iterable[str]) -> bool:
    """True if the types can all hold at once: no repeats, no listed conflict between any two."""
    ids = list(ids)
    for i in ids:
        get_constraint(i)
    if len(set(ids)) != len(ids):
        return False
    return not any(b in CONSTRAINTS[a].conflicts or a in CONSTRAINTS[b].conflicts
                   for a, b in itertools.combinations(ids, 2))


@functools.lru_cache(maxsize=64)
def _compatible_combinations(types: tuple[str, ...], n: int) -> tuple[tuple[str, ...], ...]:
    return tuple(c for c in itertools.combinations(types, n) if compatible(c))


def sample_constraints(rng: random.Random, base_response: str, n: int,
                       forbidden_combos: set[frozenset[str]] | None = None,
                       types: Sequence[str] | None = None) -> list[dict]:
    """`n` mutually compatible constraints `[{"type", "args"}]` in random order, args feasible for `base_response`.

    The set of types is drawn uniformly from the compatible `n`-sets of `types` (default: all) that contain no
    combination in `forbidden_combos` (a forbidden pair also rules out every triple holding it).
    """
    if not _WORD.search(base_response) or not any(ch.isalpha() for ch in base_response):
        raise ValueError(f"base_response needs at least one word with letters to build constraints on, "
                         f"got {base_response!r}")
    pool = tuple(sorted(set(CONSTRAINTS if types is None else types)))
    for t in pool:
        get_constraint(t)
    if not 0 <= n <= len(pool):
        raise ValueError(f"n={n} must be between 0 and the number of allowed types ({len(pool)})")
    forbidden = [f for f in (forbidden_combos or ()) if len(f) <= n]

    def allowed(combo: tuple[str, ...]) -> bool:
        return not any(f <= set(combo) for f in forbidden)

    combos = _compatible_combinations(pool, n)
    chosen = None
    for _ in range(100):  # rejection first: cheap while few combinations are forbidden
        if not combos:
            break
        candidate = rng.choice(combos)
        if allowed(candidate):
            chosen = candidate
            break
    if chosen is None:
        remaining = [c for c in combos if allowed(c)]
        if not remaining:
            raise ValueError(f"no {n} mutually compatible constraint types among {list(pool)} avoid the forbidden "
                             f"combinations; allow more types or forbid fewer combinations")
        chosen = rng.choice(remaining)
    order = list(chosen)
    rng.shuffle(order)
    return [{"type": t, "args": CONSTRAINTS[t].sample_args(rng, base_response)} for t in order]


def sample_binding_constraints(rng: random.Random, base_response: str, n: int,
                               forbidden_combos: set[frozenset[str]] | None = None,
                               tries: int = 50) -> list[dict] | None:
    """`n` compatible constraints that all bind on `base_response`, or None when `tries` draws found none.

    Binding, per constraint c: the reply that follows every other constraint of the set but not c (`compose` of
    the others) fails c; so a model that ignores c's instruction fails it, whatever else it does. The composed
    reply must pass all of them. A word limit binds only beside instructions that add no words (`adds_words`),
    since a cut reply plus an added sentence would break it. Types are drawn as in `sample_constraints`.
    """
    for _ in range(tries):
        types = [c["type"] for c in sample_constraints(rng, base_response, n, forbidden_combos)]
        if "max_words" in types and any(CONSTRAINTS[t].adds_words for t in types):
            continue
        chosen = [{"type": t, "args": CONSTRAINTS[t].binding_args(rng, base_response)} for t in types]
        if any(c["args"] is None for c in chosen):
            continue
        try:
            compose(base_response, chosen)
            # the reply that follows all but c; a subset can fail where the whole set passes (min_words' filler
            # sentence cut again by an exact sentence count), and then c's binding is undefined: draw again
            without = [compose(base_response, chosen[:i] + chosen[i + 1:]) for i in range(len(chosen))]
        except ValueError:  # these args cannot all be met on this response
            continue
        if all(not CONSTRAINTS[c["type"]].check(reply, c["args"]) for c, reply in zip(chosen, without)):
            return chosen
    return None


def compose(base_response: str, constraints: list[dict]) -> str:
    """`base_response` transformed to satisfy every constraint, applied in APPLY_ORDER.

    Raises ValueError if the types conflict, or if the args do not fit this response (a verdict still fails).
    """
    pairs = _validated(constraints)
    ids = [c.id for c, _ in pairs]
    if not compatible(ids):
        raise ValueError(f"constraint types {ids} cannot be combined (repeats or conflicts); "
                         f"see each class's `conflicts`")
    by_id = {c.id: args for c, args in pairs}
    text = base_response
    for cid in APPLY_ORDER:
        if cid in by_id:
            text = CONSTRAINTS[cid].apply(text, by_id[cid])
    failed = [c["type"] for c, ok in zip(constraints, check_response(text, constraints)) if not ok]
    if failed:
        raise ValueError(f"composed response fails {failed}: the args do not fit this base response; sample them "
                         f"with sample_args(rng, base_response). Response: {text!r}")
    return text


def describe_all(constraints: list[dict], rng: random.Random, heldout: bool, avoid_traps: bool = False) -> str:
    """The constraints' instruction sentences, in order, joined by spaces."""
    return " ".join(describe_each(constraints, rng, heldout, avoid_traps))


def describe_each(constraints: list[dict], rng: random.Random, heldout: bool, avoid_traps: bool = False) -> list[str]:
    """The constraints' instruction sentences, one per constraint, in order."""
    return [c.describe(args, rng, heldout=heldout, avoid_traps=avoid_traps) for c, args in _validated(constraints)]


def check_response(response: str, constraints: list[dict]) -> list[bool]:
    """Strict verdicts, one per constraint; an empty response follows nothing (as in IFEval's evaluation)."""
    pairs = _validated(constraints)
    return [bool(response.strip()) and c.check(response, args) for c, args in pairs]


def loose_variants(response: str) -> list[str]:
    """IFEval's loose-evaluation variants: the response without its first line, last line or both, each also
    with every '*' removed (markdown emphasis)."""
    lines = response.split("\n")
    cut = ["\n".join(lines[1:]).strip(), "\n".join(lines[:-1]).strip(), "\n".join(lines[1:-1]).strip()]
    return [response, response.replace("*", ""), *cut, *(v.replace("*", "") for v in cut)]


def check_response_loose(response: str, constraints: list[dict]) -> list[bool]:
    """IFEval "loose" verdicts: a constraint passes if any of `loose_variants(response)` passes it strictly."""
    pairs = _validated(constraints)
    variants = [v for v in loose_variants(response) if v.strip()]
    return [any(c.check(v, args) for v in variants) for c, args in pairs]
