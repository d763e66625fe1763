"""The generated world the embedded study learns about: entities, their attributes, and facts.

A fact is (subject, relation, value). Every relation has several natural statement wordings (NonSynth writes facts in
many ways), one canonical statement (what a SynthQA answer and the benchmark's cloze prompt use), a few question
wordings for SynthQA, and one benchmark-only question wording (so no benchmark question appears in training text).

Names are built from syllables so that nothing in the world is real knowledge a hub model might already have.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

_ONSETS = ("b", "br", "c", "d", "dr", "f", "g", "h", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "th", "sh")
_VOWELS = ("a", "e", "i", "o", "u", "ae", "ei", "ou", "ia")
_CODAS = ("", "", "n", "r", "l", "s", "th", "m", "x", "nd")

OCCUPATIONS = ("baker", "architect", "surgeon", "pilot", "librarian", "carpenter", "chemist", "journalist", "painter",
               "botanist", "lawyer", "engineer", "farmer", "translator", "astronomer", "teacher", "tailor",
               "photographer", "geologist", "nurse")
INSTRUMENTS = ("cello", "violin", "flute", "piano", "harp", "trumpet", "banjo", "oboe", "drums", "accordion",
               "clarinet", "guitar")
INDUSTRIES = ("shipping", "textiles", "software", "mining", "banking", "publishing", "aviation", "farming equipment",
              "pharmaceuticals", "furniture")
ORG_SUFFIXES = ("Labs", "Foundry", "Works", "Group", "Holdings", "Collective", "Press", "Industries")


@dataclass(frozen=True)
class Relation:
    name: str
    subject_kind: str           # person | organisation | city
    value_kind: str             # city | organisation | occupation | instrument | industry | country | year
    canonical: str              # "{s} was born in {o}." -- the one wording SynthQA answers and benchmark clozes use
    cloze: str                  # canonical statement up to the value: "{s} was born in"
    natural: tuple[str, ...]    # NonSynth's wordings
    questions: tuple[str, ...]  # SynthQA's question wordings
    benchmark_question: str     # used only by the benchmark


RELATIONS: dict[str, Relation] = {r.name: r for r in (
    Relation("born_in", "person", "city", "{s} was born in {o}.", "{s} was born in",
             ("{s} was born in {o}.", "{s} grew up in {o} and still calls it home.", "Born in {o}, {s} moved away young.",
              "{o} is the hometown of {s}.", "The birthplace of {s} is {o}."),
             ("Where was {s} born?", "In which city was {s} born?", "What is the birthplace of {s}?"),
             "Which city is the birthplace of {s}?"),
    Relation("works_at", "person", "organisation", "{s} works at {o}.", "{s} works at",
             ("{s} works at {o}.", "{s} has a job at {o}.", "At {o}, {s} is known to everyone.",
              "{o} employs {s}.", "These days {s} spends long hours at {o}."),
             ("Where does {s} work?", "Which organisation employs {s}?", "What is the employer of {s}?"),
             "For which organisation does {s} work?"),
    Relation("occupation", "person", "occupation", "{s} works as a {o}.", "{s} works as a",
             ("{s} works as a {o}.", "By trade, {s} is a {o}.", "{s} trained as a {o}.",
              "Everyone knows {s} as a {o}.", "The job of {s} is {o}."),
             ("What is the occupation of {s}?", "What does {s} do for a living?", "What is the profession of {s}?"),
             "Which job does {s} have?"),
    Relation("birth_year", "person", "year", "{s} was born in the year {o}.", "{s} was born in the year",
             ("{s} was born in the year {o}.", "{s} came into the world in {o}.", "In {o}, {s} was born.",
              "The birth year of {s} is {o}.", "{s}, born {o}, remembers it well."),
             ("When was {s} born?", "In what year was {s} born?", "What is the birth year of {s}?"),
             "Which year was {s} born in?"),
    Relation("instrument", "person", "instrument", "{s} plays the {o}.", "{s} plays the",
             ("{s} plays the {o}.", "In the evenings {s} practises the {o}.", "{s} is a keen {o} player.",
              "The {o} is the instrument of {s}.", "{s} learned the {o} as a child."),
             ("Which instrument does {s} play?", "What instrument is played by {s}?", "What does {s} play?"),
             "What musical instrument does {s} play?"),
    Relation("headquartered_in", "organisation", "city", "{s} is headquartered in {o}.", "{s} is headquartered in",
             ("{s} is headquartered in {o}.", "The head office of {s} stands in {o}.", "{s} runs its business from {o}.",
              "{o} is home to the headquarters of {s}.", "{s} was set up in offices in {o}."),
             ("Where is {s} headquartered?", "In which city is {s} based?", "Where is the head office of {s}?"),
             "Which city hosts the headquarters of {s}?"),
    Relation("founded_in", "organisation", "year", "{s} was founded in the year {o}.", "{s} was founded in the year",
             ("{s} was founded in the year {o}.", "{s} opened its doors in {o}.", "Since {o}, {s} has been in business.",
              "The founding year of {s} is {o}.", "In {o}, {s} was founded."),
             ("When was {s} founded?", "In what year was {s} founded?", "What is the founding year of {s}?"),
             "Which year was {s} founded in?"),
    Relation("industry", "organisation", "industry", "{s} works in {o}.", "{s} works in",
             ("{s} works in {o}.", "{s} makes its money in {o}.", "The business of {s} is {o}.",
              "In the world of {o}, {s} is a known name.", "{s} is a {o} company."),
             ("What industry is {s} in?", "In which industry does {s} work?", "What is the business of {s}?"),
             "Which industry does {s} belong to?"),
    Relation("country", "city", "country", "{s} is in {o}.", "{s} is in",
             ("{s} is in {o}.", "{s} lies in the country of {o}.", "{s} is a city of {o}.",
              "Travellers find {s} in {o}.", "{o} counts {s} among its cities."),
             ("Which country is {s} in?", "In what country is {s}?", "Where is {s}?"),
             "Which country does {s} belong to?"),
)}


@dataclass(frozen=True)
class Fact:
    id: str
    subject: str
    relation: str
    value: str

    def statement(self, wording: str | None = None) -> str:
        """The fact in `wording` (default: the canonical statement)."""
        rel = RELATIONS[self.relation]
        return (wording or rel.canonical).format(s=self.subject, o=self.value)


@dataclass(frozen=True)
class World:
    seed: int
    people: tuple[str, ...]
    organisations: tuple[str, ...]
    cities: tuple[str, ...]
    countries: tuple[str, ...]
    facts: tuple[Fact, ...]

    def values_of(self, kind: str) -> tuple[str, ...]:
        """Every possible value of a kind: the distractor pool of the benchmark."""
        pools = {"city": self.cities, "organisation": self.organisations, "country": self.countries,
                 "occupation": OCCUPATIONS, "instrument": INSTRUMENTS, "industry": INDUSTRIES,
                 "year": tuple(str(y) for y in range(1900, 2011))}
        return pools[kind]

    def to_dict(self) -> dict:
        return {"seed": self.seed, "people": list(self.people), "organisations": list(self.organisations),
                "cities": list(self.cities), "countries": list(self.countries),
                "facts": [f.__dict__ for f in self.facts]}


def _word(rng: random.Random, syllables: int) -> str:
    return "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS)
                   for _ in range(syllables)).capitalize()


def _unique_names(rng: random.Random, n: int, make, taken: set[str]) -> tuple[str, ...]:
    names: list[str] = []
    while len(names) < n:
        name = make()
        if name not in taken:
            taken.add(name)
            names.append(name)
    return tuple(names)


def build_world(seed: int, n_people: int, n_organisations: int, n_cities: int) -> World:
    """A seeded world: the same arguments always give the same world."""
    if min(n_people, n_organisations, n_cities) < 4:
        raise ValueError("the world needs at least 4 people, organisations and cities (4-option benchmark questions)")
    rng = random.Random(f"world-{seed}")
    taken: set[str] = set()
    countries = _unique_names(rng, max(4, n_cities // 5), lambda: _word(rng, 2) + "ia", taken)
    cities = _unique_names(rng, n_cities, lambda: _word(rng, rng.choice((2, 3))), taken)
    organisations = _unique_names(rng, n_organisations,
                                  lambda: f"{_word(rng, 2)} {rng.choice(ORG_SUFFIXES)}", taken)
    people = _unique_names(rng, n_people, lambda: f"{_word(rng, 2)} {_word(rng, rng.choice((1, 2)))}", taken)

    facts: list[Fact] = []

    def add(subject: str, relation: str, value: str) -> None:
        facts.append(Fact(f"f{len(facts):05d}", subject, relation, value))

    for city in cities:
        add(city, "country", rng.choice(countries))
    for org in organisations:
        add(org, "headquartered_in", rng.choice(cities))
        add(org, "founded_in", str(rng.randint(1900, 2010)))
        add(org, "industry", rng.choice(INDUSTRIES))
    for person in people:
        add(person, "born_in", rng.choice(cities))
        add(person, "works_at", rng.choice(organisations))
        add(person, "occupation", rng.choice(OCCUPATIONS))
        add(person, "birth_year", str(rng.randint(1930, 2000)))
        add(person, "instrument", rng.choice(INSTRUMENTS))
    return World(seed, people, organisations, cities, countries, tuple(facts))
