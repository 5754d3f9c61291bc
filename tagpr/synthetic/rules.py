"""The synthetic tasks' rules: one generator per LaMP task, each a set of latent rules a user can hold.

A generator has `rules` (name → explanation), `content(rng)` (one input's hidden facts), `input(c)` (the text a
model sees), `answer(rule, c)` (the gold under a rule) and `item(rule, c, rng)` (a profile item the user wrote).
`generator(task, difficulty)` returns the one for a task at a difficulty ("hard": every task; "easy": LaMP_2).
"""

from __future__ import annotations

import itertools
import random

from .. import lamp

# ----------------------------------------------------------------------------- shared pools

NAMES = (
    "Ada",
    "Bruno",
    "Chen",
    "Dara",
    "Elif",
    "Farid",
    "Greta",
    "Hiro",
    "Ines",
    "Jonas",
    "Kemi",
    "Luca",
    "Mira",
    "Nikos",
    "Olga",
    "Pavel",
    "Quinn",
    "Rosa",
    "Sami",
    "Tariq",
    "Uma",
    "Vera",
    "Wen",
    "Yara",
)
JOBS = (
    "a retired detective",
    "a young nurse",
    "a struggling painter",
    "a ship mechanic",
    "a school teacher",
    "a disgraced chef",
    "a night-shift guard",
    "a jazz pianist",
    "a small-town mayor",
    "a rookie pilot",
)


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


# ----------------------------------------------------------------------------- task generators
# Each generator: rules (names → explanation), content(rng) → dict, input(c) → str,
# answer(rule, c) → str, item(rule, c, rng) → profile fields; the easy LaMP-2 / LaMP-3 ones also key(c) → the
# input's word that picks the user's answer (its genre, its product), which "bound" chains name at the decision.


class LaMP1:
    task = "LaMP_1"
    FIELDS = {
        "graph learning": ("graph", "node", "edge", "message passing", "molecule", "link prediction"),
        "computer vision": ("image", "pixel", "segmentation", "object detection", "video", "camera"),
        "speech": ("speech", "acoustic", "phoneme", "speaker", "audio", "voice"),
        "robotics": ("robot", "grasping", "manipulation", "locomotion", "gripper", "motion planning"),
        "databases": ("query", "index", "transaction", "join", "storage engine", "SQL"),
        "cryptography": ("encryption", "cipher", "zero-knowledge", "signature", "key exchange", "lattice"),
        "genomics": ("gene", "genome", "protein", "sequencing", "mutation", "cell"),
        "economics": ("market", "auction", "pricing", "labor", "inflation", "trade"),
    }
    rules = {f: f"This author works in {f}: the related reference is the one about {f}." for f in FIELDS}
    GENERIC = (
        "A Simple Baseline for {x}",
        "Rethinking {x}",
        "{x} Revisited",
        "Towards Practical {x}",
        "Scalable Methods for {x}",
        "An Empirical Study of {x}",
        "Lessons Learned from {x}",
    )
    GENERIC_X = (
        "Robust Estimation",
        "Efficient Learning",
        "Structured Prediction",
        "Large-Scale Systems",
        "Reliable Evaluation",
        "Adaptive Optimization",
        "Data Efficiency",
    )
    ADJ = ("Efficient", "Robust", "Scalable", "Fast", "Provable", "Learned", "Sparse", "Adaptive")
    NOUN = ("methods", "models", "algorithms", "representations", "benchmarks", "systems")

    def _paper(self, f: str, rng: random.Random) -> tuple[str, str]:
        a, b = rng.sample(self.FIELDS[f], 2)
        title = f"{rng.choice(self.ADJ)} {a} {rng.choice(self.NOUN)} for {b}"
        abstract = f"We study {a} and {b} in {f}. Our {rng.choice(self.NOUN)} improve {a} on standard {b} benchmarks."
        return title, abstract

    def content(self, rng):
        fields = list(self.FIELDS)
        own, other = rng.sample(fields, 2)
        return {
            "title": rng.choice(self.GENERIC).format(x=rng.choice(self.GENERIC_X)),
            "own": own,
            "other": other,
            "ref_own": self._paper(own, rng)[0],
            "ref_other": self._paper(other, rng)[0],
            "own_first": rng.random() < 0.5,
        }

    def input(self, c):
        r1, r2 = (c["ref_own"], c["ref_other"]) if c["own_first"] else (c["ref_other"], c["ref_own"])
        return lamp.TASKS[self.task].template.format(title=c["title"], ref1=r1, ref2=r2)

    def answer(self, rule, c):
        # the reference in the author's field; if neither is, the first
        first, second = (c["own"], c["other"]) if c["own_first"] else (c["other"], c["own"])
        return "[2]" if second == rule and first != rule else "[1]"

    def content_for(self, rule, rng):
        c = self.content(rng)
        if c["own"] != rule:  # questions of this user: the "own" paper is in the user's field
            other = c["other"] if c["other"] != rule else c["own"]
            c.update(own=rule, other=other, ref_own=self._paper(rule, rng)[0], ref_other=self._paper(other, rng)[0])
        return c

    def item(self, rule, c, rng):
        title, abstract = self._paper(rule, rng)
        return {"title": title, "abstract": abstract}

    def summary(self, c):
        first, second = (c["own"], c["other"]) if c["own_first"] else (c["other"], c["own"])
        return f"reference [1] is about {first} and reference [2] is about {second}"


class LaMP2:
    task = "LaMP_2"
    LENSES = {
        "genre": {
            "sci-fi": (
                "aboard a starship drifting past Jupiter",
                "in a future run by sentient machines",
                "on a distant space colony",
            ),
            "comedy": (
                "through a string of slapstick mishaps",
                "in a goofy misadventure full of gags",
                "as hilarious misunderstandings pile up",
            ),
            "action": (
                "through explosive car chases",
                "amid relentless shootouts and fistfights",
                "in a high-speed chase across rooftops",
            ),
            "fantasy": (
                "in a kingdom of dragons and wizards",
                "guided by an enchanted sword",
                "through a realm of elves and magic",
            ),
            "romance": (
                "while slowly falling in love with a stranger",
                "in a tender love story",
                "while torn between two lovers",
            ),
        },
        "story": {
            "based on a book": (
                "adapted from the bestselling novel",
                "based on the beloved book",
                "faithful to the pages of the original novel",
            ),
            "twist ending": (
                "until a final revelation changes everything",
                "with a shocking twist in the last scene",
                "and nothing is what it seems at the end",
            ),
            "true story": ("inspired by real events", "based on a true story", "recounting what really happened"),
            "classic": (
                "in a timeless black-and-white masterpiece",
                "in the golden-age original from 1946",
                "in an old Hollywood favourite",
            ),
            "dystopia": (
                "inside an oppressive surveillance state",
                "after society has collapsed",
                "under a totalitarian regime",
            ),
        },
        "theme": {
            "dark comedy": ("laughing at death and misfortune", "with grim gallows humour", "in a morbidly funny way"),
            "psychology": (
                "exploring a fractured mind",
                "as a study of obsession and memory",
                "deep inside the hero's paranoia",
            ),
            "thought-provoking": (
                "raising deep questions about free will",
                "asking what it means to be human",
                "as a meditation on time and choice",
            ),
            "social commentary": (
                "as a sharp critique of inequality",
                "skewering corporate greed",
                "exposing class and power",
            ),
            "violence": (
                "drenched in brutal bloodshed",
                "with graphic, unflinching violence",
                "in a savage revenge spree",
            ),
        },
    }
    rules = {
        "genre": "This user tags a movie by its genre (sci-fi, comedy, action, fantasy or romance).",
        "story": "This user tags a movie by its story device or source (based on a book, twist ending, true story, "
        "classic or dystopia).",
        "theme": "This user tags a movie by its theme (dark comedy, psychology, thought-provoking, social commentary "
        "or violence).",
    }

    def content(self, rng):
        c = {lens: rng.choice(list(tags)) for lens, tags in self.LENSES.items()}
        c["phrases"] = {lens: rng.choice(self.LENSES[lens][c[lens]]) for lens in self.LENSES}
        c["who"] = f"{rng.choice(NAMES)}, {rng.choice(JOBS)},"
        c["order"] = rng.sample(list(self.LENSES), 3)
        return c

    def _description(self, c):
        p = c["phrases"]
        return f"{c['who']} fights to survive {p[c['order'][0]]}, {p[c['order'][1]]}, {p[c['order'][2]]}."

    def input(self, c):
        return lamp.TASKS[self.task].template.format(description=self._description(c))

    def answer(self, rule, c):
        return c[rule]

    def item(self, rule, c, rng):
        return {"description": self._description(c), "tag": c[rule]}

    def summary(self, c):
        return f"a {c['genre']} movie, its story device is {c['story']}, its theme is {c['theme']}"


class LaMP2Easy(LaMP2):
    """LaMP-2 at difficulty "easy": the evidence is lexical. Every movie names its genre in so many words, a user
    watches two genres and gives each its own tag (one of the ten story / theme tags), and the two most recent
    profile items are one of each genre. The answer is the tag the user gave the profile item whose genre word
    matches the input's: find the matching word, copy the tag next to it. Without the profile the tag is a guess
    among ten (floor ≈ 0.1); another user's profile points to another user's tags."""

    GENRES = tuple(LaMP2.LENSES["genre"])
    LABELS = tuple(LaMP2.LENSES["story"]) + tuple(LaMP2.LENSES["theme"])
    rules = {
        f"{g0}={l0};{g1}={l1}": f'This user tags {g0} movies "{l0}" and {g1} movies "{l1}".'
        for (g0, g1), (l0, l1) in itertools.product(
            itertools.combinations(GENRES, 2), itertools.permutations(LABELS, 2)
        )
    }

    @staticmethod
    def parse(rule: str) -> dict[str, str]:
        """ "sci-fi=classic;comedy=violence" → {"sci-fi": "classic", "comedy": "violence"}."""
        return dict(part.split("=") for part in rule.split(";"))

    def content(self, rng, genre: str | None = None):
        c = super().content(rng)
        if genre is not None:
            c["genre"] = genre
            c["phrases"]["genre"] = rng.choice(self.LENSES["genre"][genre])
        return c

    def content_for(self, rule, rng):
        return self.content(rng, rng.choice(list(self.parse(rule))))

    def profile_content(self, rule, j, n_items, rng):
        """Item j of n (by date): the most recent two are one of each of the user's genres, the rest alternate."""
        genres = list(self.parse(rule))
        return self.content(rng, genres[(n_items - 1 - j) % 2])

    def _description(self, c):  # the genre named, and one phrase of it: nothing else to read
        return f"A {c['genre']} movie: {c['who']} fights to survive {c['phrases']['genre']}."

    def answer(self, rule, c):
        return self.parse(rule).get(c["genre"], self.LABELS[0])

    def item(self, rule, c, rng):
        return {"description": self._description(c), "tag": self.answer(rule, c)}

    def summary(self, c):
        return f"a {c['genre']} movie"

    def key(self, c):
        return f"{c['genre']} movie"


class LaMP3:
    task = "LaMP_3"
    SENTIMENT = {
        1: ("is a complete waste of money", "broke after one day", "is awful in every way"),
        2: ("is disappointing", "is flimsy and mediocre", "is worse than I expected"),
        3: ("is okay", "is average and does the job", "is neither good nor bad"),
        4: ("works well", "is pretty solid", "is good value"),
        5: ("is absolutely perfect", "is the best purchase I ever made", "is excellent in every way"),
    }
    PRODUCTS = (
        "blender",
        "backpack",
        "desk lamp",
        "phone case",
        "kettle",
        "headphones",
        "yoga mat",
        "toaster",
        "umbrella",
        "office chair",
    )
    FILLER = (
        "Arrived on time.",
        "Bought it for my kitchen.",
        "Used it for a month.",
        "Gift for my brother.",
        "Packaging was fine.",
        "Ordered the blue one.",
    )
    rules = {
        "harsh": "This user rates one notch below what the review's words suggest.",
        "neutral": "This user's rating matches the sentiment of the review's words.",
        "generous": "This user rates one notch above what the review's words suggest.",
    }
    BIAS = {"harsh": -1, "neutral": 0, "generous": 1}

    def content(self, rng):
        s = rng.randint(1, 5)
        return {
            "s": s,
            "text": f"This {rng.choice(self.PRODUCTS)} {rng.choice(self.SENTIMENT[s])}. {rng.choice(self.FILLER)}",
        }

    def input(self, c):
        return lamp.TASKS[self.task].template.format(text=c["text"])

    def answer(self, rule, c):
        return str(min(5, max(1, c["s"] + self.BIAS[rule])))

    def item(self, rule, c, rng):
        return {"text": c["text"], "score": self.answer(rule, c)}

    def summary(self, c):
        return f"the words of the review read like a {c['s']} out of 5"


class LaMP4:
    task = "LaMP_4"
    SUBJECTS = (
        "the city council",
        "local farmers",
        "the school board",
        "a tech startup",
        "state regulators",
        "the transit authority",
        "hospital workers",
        "the football club",
    )
    ACTIONS = (
        ("approves", "approve"),
        ("rejects", "reject"),
        ("delays", "delay"),
        ("funds", "fund"),
        ("debates", "debate"),
        ("launches", "launch"),
    )
    OBJECTS = (
        "a new park budget",
        "solar panels on schools",
        "a four-day work week",
        "free bus fares",
        "a stadium expansion",
        "water price hikes",
        "a housing plan",
        "late-night curfews",
    )
    PLACES = ("Springfield", "Riverton", "Lakeview", "Oakdale", "Brookfield", "Maple Hill")
    # each style keeps a different slot of the article, so a wrong style shares few words
    rules = {
        "wire": "This user writes plain wire headlines: '[Subject] [action] [object]'.",
        "question": "This user asks the place's readers: 'Is [place] ready for [object]?'",
        "listicle": "This user writes listicles about the subject: 'Five things [subject] said on [day]'.",
        "opinion": "This user writes opinion headlines about the place: 'Opinion: [place] deserves a better vote'.",
    }

    def content(self, rng):
        return {
            "subject": rng.choice(self.SUBJECTS),
            "action": rng.choice(self.ACTIONS),
            "object": rng.choice(self.OBJECTS),
            "place": rng.choice(self.PLACES),
            "day": rng.choice(("Monday", "Tuesday", "Wednesday", "Thursday", "Friday")),
        }

    def _article(self, c):
        return (
            f"{c['place']}, {c['day']}: {_cap(c['subject'])} {c['action'][0]} {c['object']}, officials said. "
            f"The decision follows weeks of public meetings in {c['place']}."
        )

    def input(self, c):
        return lamp.TASKS[self.task].template.format(text=self._article(c))

    def answer(self, rule, c):
        s, (v, _), o, p, d = c["subject"], c["action"], c["object"], c["place"], c["day"]
        return {
            "wire": f"{_cap(s)} {v} {o}",
            "question": f"Is {p} ready for {o}?",
            "listicle": f"Five things {s} said on {d}",
            "opinion": f"Opinion: {p} deserves a better vote",
        }[rule]

    def item(self, rule, c, rng):
        return {"text": self._article(c), "title": self.answer(rule, c)}

    def summary(self, c):
        return (
            f"subject: {c['subject']}; action: {c['action'][0]}; object: {c['object']}; place: {c['place']}; "
            f"day: {c['day']}"
        )


class LaMP5:
    task = "LaMP_5"
    METHODS = ("FastGraph", "DeepSieve", "LiteNet", "ProtoMix", "SparseFormer", "TinyTune", "FlowMatch", "MetaRank")
    TASKS_ = (
        "node classification",
        "image retrieval",
        "speech recognition",
        "text summarization",
        "drug discovery",
        "traffic forecasting",
        "code generation",
        "anomaly detection",
    )
    PROPS = (
        ("efficient", "efficiency"),
        ("robust", "robustness"),
        ("scalable", "scalability"),
        ("interpretable", "interpretability"),
        ("private", "privacy"),
    )
    DOMAINS = (
        "molecular graphs",
        "satellite images",
        "clinical notes",
        "noisy audio",
        "legal documents",
        "sensor streams",
    )
    rules = {
        "colon": "This user names the method: '[Method]: A [Property] Approach'.",
        "question": "This user asks about the task: 'Can We Finally Solve [Task]?'",
        "towards": "This user titles by the data: 'Towards Better Models of [Domain]'.",
        "on-the": "This user titles by the property: 'On the [Property noun] of Learned Systems'.",
    }

    def content(self, rng):
        return {
            "method": rng.choice(self.METHODS),
            "task": rng.choice(self.TASKS_),
            "prop": rng.choice(self.PROPS),
            "domain": rng.choice(self.DOMAINS),
        }

    def _abstract(self, c):
        return (
            f"We study {c['task']} on {c['domain']}. We propose {c['method']}, a {c['prop'][0]} approach, "
            f"and show that {c['method']} outperforms strong baselines."
        )

    def input(self, c):
        return lamp.TASKS[self.task].template.format(abstract=self._abstract(c))

    def answer(self, rule, c):
        m, t, (adj, noun), d = c["method"], c["task"], c["prop"], c["domain"]
        return {
            "colon": f"{m}: A {_cap(adj)} Approach",
            "question": f"Can We Finally Solve {_cap(t)}?",
            "towards": f"Towards Better Models of {_cap(d)}",
            "on-the": f"On the {_cap(noun)} of Learned Systems",
        }[rule]

    def item(self, rule, c, rng):
        return {"title": self.answer(rule, c), "abstract": self._abstract(c)}

    def summary(self, c):
        return f"method: {c['method']}; property: {c['prop'][0]}; task: {c['task']}; data: {c['domain']}"


class LaMP7:
    task = "LaMP_7"
    OPENERS = ("I just finished", "We finally tried", "I am watching", "I spent the day at", "We are going to")
    THINGS = (
        "the new ramen place downtown",
        "a marathon of old cartoons",
        "the farmers market",
        "my first pottery class",
        "the beach with my dog",
        "the concert in the park",
        "a long bike ride",
    )
    FEELINGS = (
        "It was really good and I love it.",
        "You should come with us next time.",
        "I am so tired but it was worth it.",
        "It was really fun because the weather was great.",
    )
    ABBREV = {
        "you": "u",
        "are": "r",
        "really": "rly",
        "because": "bc",
        "love": "luv",
        "with": "w",
        "and": "n",
        "the": "da",
        "so": "sooo",
        "just": "jst",
        "was": "wuz",
        "good": "gud",
        "going": "goin",
        "next": "nxt",
        "great": "gr8",
        "to": "2",
        "am": "m",
        "is": "iz",
        "but": "bt",
        "worth": "wrth",
        "time": "tym",
        "tired": "tird",
        "my": "ma",
        "should": "shud",
        "come": "cum",
        "us": "uz",
        "new": "nu",
        "place": "plc",
        "first": "1st",
    }
    rules = {
        "plain": "This user tweets plainly, as written.",
        "hype": "This user keeps only the activity: 'omg omg [activity] best day ever lol'.",
        "abbreviator": "This user abbreviates every word it can: u, r, rly, bc, luv, w, n, da, jst, wuz, gud, 2, ...",
        "terse": "This user tweets only the activity and a verdict: '[activity]. ten out of ten, no notes'.",
    }

    def content(self, rng):
        return {
            "opener": rng.choice(self.OPENERS),
            "thing": rng.choice(self.THINGS),
            "feeling": rng.choice(self.FEELINGS),
        }

    def input(self, c):
        return lamp.TASKS[self.task].template.format(text=f"{c['opener']} {c['thing']}. {c['feeling']}")

    def answer(self, rule, c):
        text = f"{c['opener']} {c['thing']}. {c['feeling']}"
        if rule == "hype":
            return f"omg omg {c['thing']} best day ever lol"
        if rule == "abbreviator":
            return " ".join(self._abbrev(w) for w in text.split(" "))
        if rule == "terse":
            return f"{_cap(c['thing'])}. ten out of ten, no notes"
        return text

    def _abbrev(self, word):
        core = word.rstrip(".,!?")
        return self.ABBREV.get(core.lower(), core) + word[len(core) :]

    def item(self, rule, c, rng):
        return {"text": self.answer(rule, c)}

    def summary(self, c):
        return f"the activity is {c['thing']}"


class LaMP3Easy(LaMP3):
    """LaMP-3 at difficulty "easy": a user reviews products of two kinds and gives each kind its own rating,
    whatever the review's words say. Every review names its product and reads lukewarm (the words point to no
    rating), and the two most recent profile items are one of each of the user's kinds. The answer is the rating
    the user gave the profile item of the input's product: find the product word, copy the score next to it.
    Without the profile the best guess is the median rating (floor MAE ≈ 1.2); another user's profile points to
    another user's ratings."""

    WORDS = ("does what it says", "is fine, I suppose", "came as described", "is what I ordered")
    rules = {
        f"{p0}={r0};{p1}={r1}": f"This user rates every {p0} {r0} and every {p1} {r1}, whatever the review says."
        for (p0, p1), (r0, r1) in itertools.product(
            itertools.combinations(LaMP3.PRODUCTS, 2), itertools.permutations("12345", 2)
        )
    }

    @staticmethod
    def parse(rule: str) -> dict[str, str]:
        """ "blender=2;kettle=5" → {"blender": "2", "kettle": "5"}."""
        return dict(part.split("=") for part in rule.split(";"))

    def content(self, rng, product: str | None = None):
        product = product or rng.choice(self.PRODUCTS)
        return {"product": product, "text": f"This {product} {rng.choice(self.WORDS)}. {rng.choice(self.FILLER)}"}

    def content_for(self, rule, rng):
        return self.content(rng, rng.choice(list(self.parse(rule))))

    def profile_content(self, rule, j, n_items, rng):
        """Item j of n (by date): the most recent two are one of each of the user's products, the rest alternate."""
        products = list(self.parse(rule))
        return self.content(rng, products[(n_items - 1 - j) % 2])

    def answer(self, rule, c):
        return self.parse(rule).get(c["product"], "3")

    def summary(self, c):
        return f"a review of a {c['product']} whose words are lukewarm"

    def key(self, c):
        return c["product"]


class LaMP7Easy(LaMP7):
    """LaMP-7 at difficulty "easy": a user keeps a signature, one opening phrase and one sign-off, around the
    activity of every tweet ("Big news, friends: the farmers market. Stay curious!"). Every profile item shows
    both, so any one pins the style down; the content (the activity) comes from the input. ROUGE rewards both: the
    activity alone scores ~0.4, the user's signature around it 1.0. Without the profile the best single signature
    is the floor; another user's profile points to another signature."""

    OPENINGS = (
        "Big news, friends:",
        "Quick update from me:",
        "Guess what, everyone:",
        "Today's little adventure:",
        "Checking in again with",
        "You will never believe it,",
    )
    SIGN_OFFS = (
        "Stay curious!",
        "Peace and pancakes.",
        "More soon, promise.",
        "Catch you on the flip side.",
        "That is all for now.",
        "Keep smiling, people.",
    )
    rules = {
        f"{o}|{e}": f'This user opens every tweet with "{o}" and signs off with "{e}".'
        for o, e in itertools.product(OPENINGS, SIGN_OFFS)
    }

    def answer(self, rule, c):
        opening, sign_off = rule.split("|")
        return f"{opening} {c['thing']}. {sign_off}"

    def item(self, rule, c, rng):
        return {"text": self.answer(rule, c)}

    def summary(self, c):
        return f"the activity is {c['thing']}"


GENERATORS = {g.task: g for g in (LaMP1(), LaMP2(), LaMP3(), LaMP4(), LaMP5(), LaMP7())}
SYNTHETIC_TASKS = tuple(GENERATORS)
# difficulty → the tasks that have a generator at that level ("hard" is every task's default: GENERATORS)
DIFFICULTIES = {"hard": GENERATORS, "easy": {g.task: g for g in (LaMP2Easy(), LaMP3Easy(), LaMP7Easy())}}


def generator(task: str, difficulty: str = "hard"):
    """The generator of a task at a difficulty (docs/synthetic.md says what each level measures)."""
    name = lamp.get_task(task).name
    if difficulty not in DIFFICULTIES:
        raise ValueError(f"unknown synthetic difficulty {difficulty!r}; expected one of {', '.join(DIFFICULTIES)}")
    if name not in DIFFICULTIES[difficulty]:
        raise ValueError(
            f"{name} has no {difficulty!r} synthetic users; {difficulty!r} exists for "
            f"{', '.join(DIFFICULTIES[difficulty])}"
        )
    return DIFFICULTIES[difficulty][name]


def latent_generator(task: str, latent: dict):
    """The generator that wrote a question, from its latent record (files written before difficulties: hard)."""
    return generator(task, latent.get("difficulty", "hard"))
