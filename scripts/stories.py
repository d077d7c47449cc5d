"""Short stories in simple English from a small seeded grammar, and questions about them.

A story follows a child through a day: somewhere to go, something found, a friend and what
they say, a count of animals, a gift, a snack sum, a pet that finds what was lost, and the
way home. Each event has a few wordings, and which events happen, to whom and with what
is drawn at random, so the stories share a vocabulary of a few hundred words yet differ
in their facts. Every fact a story states is recorded as a question with a one-word
answer (`Story.questions`): what the fine-tuning task asks about, and what some
pretraining stories end with.

Everything comes from `random.Random` seeded with a string, so a seed gives the same text
on every machine (string seeds are hashed with SHA-512, not Python's salted hash).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field

GIRLS = ["Lily", "Mia", "Anna", "Zoe", "Emma", "Ella", "Lucy", "Sara", "Nora", "Ruby",
         "Rosa", "Ivy", "Maya", "Alice", "Hana", "Amy", "Kate", "Jane"]
BOYS = ["Tom", "Ben", "Sam", "Max", "Leo", "Jack", "Finn", "Omar", "Noah", "Adam",
        "Luke", "Theo", "Ravi", "Ken", "Dan", "Eli", "Hugo", "Paul"]
PETS = {"dog": ["Rex", "Buddy", "Spot", "Rocky"], "cat": ["Misty", "Tiger", "Socks", "Luna"],
        "rabbit": ["Coco", "Snowy", "Hopper"], "parrot": ["Kiwi", "Sunny", "Pepper"]}
ADULTS = ["Mom", "Dad", "Grandma", "Grandpa"]



@dataclass(frozen=True)
class Place:
    at: str  # "in the park"
    to: str  # "to the park"
    spots: tuple[str, ...]  # where something can lie there


PLACES = {
    "park": Place("in the park", "to the park", ("under a big tree", "near the swings", "behind a bench")),
    "forest": Place("in the forest", "to the forest", ("under a log", "next to a tall pine", "in a pile of leaves")),
    "beach": Place("on the beach", "to the beach", ("in the sand", "near the water", "under a rock")),
    "garden": Place("in the garden", "to the garden", ("between the flowers", "under a bush", "next to the fence")),
    "farm": Place("on the farm", "to the farm", ("in the barn", "near the pond", "behind the hay")),
    "library": Place("at the library", "to the library", ("under a chair", "on a high shelf", "behind a desk")),
    "market": Place("at the market", "to the market", ("under a table", "next to the fruit", "in a basket")),
    "river": Place("by the river", "to the river", ("on the bank", "under the bridge", "between two stones")),
    "hill": Place("on the hill", "up the hill", ("near the top", "behind a big rock", "in the tall grass")),
    "school": Place("at school", "to school", ("under a desk", "near the door", "in the yard")),
    "zoo": Place("at the zoo", "to the zoo", ("by the gate", "near the monkeys", "under a bench")),
    "lake": Place("by the lake", "to the lake", ("on the dock", "near the boats", "under a willow")),
}
OBJECTS = ["ball", "kite", "hat", "book", "key", "box", "cup", "shell", "map", "lamp", "coin",
           "drum", "bell", "boat", "doll", "sock", "spoon", "scarf", "ring", "bag", "train",
           "car", "robot", "whistle", "feather", "button", "crayon", "jar"]
COLORS = ["red", "blue", "green", "yellow", "orange", "purple", "pink", "white", "black",
          "brown", "gold", "silver"]
ANIMALS = {"ducks": "swimming in the water", "birds": "sitting on a wire", "frogs": "jumping by the pond",
           "fish": "swimming in a pool", "butterflies": "flying over the grass", "cows": "eating grass",
           "sheep": "walking on the hill", "squirrels": "running up a tree", "bees": "buzzing around a flower",
           "boats": "sailing far away", "snails": "crawling on a leaf", "goats": "standing on a rock"}
SNACKS = ["apples", "cookies", "grapes", "cherries", "plums", "nuts", "carrots", "crackers"]
WEATHER = ["sunny", "rainy", "windy", "cold", "warm", "cloudy", "snowy"]
TIMES = ["morning", "afternoon", "day"]
FEELINGS = ["happy", "glad", "excited", "proud", "surprised"]
SAY = ["said", "said", "shouted", "whispered", "laughed"]

QUIZ_HEADER = "\n\nQuestions about the story:\n"  # between a story and the questions that end it

NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
                "ten", "eleven", "twelve"]


@dataclass
class Person:
    name: str
    girl: bool

    @property
    def he(self) -> str:
        return "she" if self.girl else "he"

    @property
    def him(self) -> str:
        return "her" if self.girl else "him"

    @property
    def his(self) -> str:
        return "her" if self.girl else "his"

    @property
    def kind(self) -> str:
        return "girl" if self.girl else "boy"


@dataclass
class Story:
    text: str
    questions: list[tuple[str, str]] = field(default_factory=list)  # (question, one-word answer)
    sentences: list[str] = field(default_factory=list)  # the story's sentences, in order
    evidence: list[tuple[int, ...]] = field(default_factory=list)  # per question: the sentences that answer it


class _Writer:
    """Builds one story: sentences grouped in paragraphs, and the questions they answer."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        self.paragraphs: list[list[str]] = [[]]
        self.questions: list[tuple[str, str]] = []
        self.sentences: list[str] = []
        # The sentences said since the last question are the event the next questions ask about.
        self.event_start, self.asking = 0, False
        self.events: list[tuple[int, int]] = []  # per question: (first, end) sentence of its event
        self.stated_in: list[str | None] = []  # per question: the sentence that states it, where named

    def say(self, *sentences: str) -> None:
        if self.asking:
            self.event_start, self.asking = len(self.sentences), False
        self.paragraphs[-1].extend(sentences)
        self.sentences.extend(sentences)

    def ask(self, question: str, answer: str, stated_in: str | None = None) -> None:
        """`stated_in`: the event's sentence that states the answer, where an earlier one
        holds the same word with another meaning ("had 4 crackers" before "gave her 4 more")."""
        self.asking = True
        self.questions.append((question, answer))
        self.events.append((self.event_start, len(self.sentences)))
        self.stated_in.append(stated_in)

    def evidence(self) -> list[tuple[int, ...]]:
        """Per question, the sentences that state its answer.

        The sentence `ask` was told of, or else the first sentence of the question's event
        holding the answer word; where the event does not name it ("Ben looked under a tree
        and found a ball" for "Where did Ben find the ball? park"), the story's first
        sentence that does, with the event's first.
        """
        def holds(i: int, word: str) -> bool:
            return re.search(rf"(?<!\w){re.escape(word)}(?!\w)", self.sentences[i]) is not None

        found = []
        for (_, answer), (first, end), stated_in in zip(self.questions, self.events, self.stated_in):
            if stated_in is not None:
                in_event = [self.sentences.index(stated_in, first, end)]
            else:
                in_event = [i for i in range(first, end) if holds(i, answer)]
            if in_event:
                found.append((in_event[0],))
            else:
                anywhere = next(i for i in range(len(self.sentences)) if holds(i, answer))
                found.append(tuple(sorted({anywhere, first})))
        return found

    def paragraph(self) -> None:
        if self.paragraphs[-1]:
            self.paragraphs.append([])

    def pick(self, options):
        return self.rng.choice(options)

    def text(self) -> str:
        return "\n\n".join(" ".join(p) for p in self.paragraphs if p)


def _cap(s: str) -> str:
    return s[0].upper() + s[1:]


def _a(word: str) -> str:
    """The word with its indefinite article: "a red", "an orange", "an 8"."""
    vowel_sound = word[0] in "aeiou" or word.startswith(("8", "11", "18"))
    return f"an {word}" if vowel_sound else f"a {word}"


def _number(rng: random.Random, n: int) -> str:
    """Numbers are written as digits or words, so a model sees both; answers use digits."""
    return str(n) if n > len(NUMBER_WORDS) - 1 or rng.random() < 0.6 else NUMBER_WORDS[n]


def write_story(seed: str, events: tuple[int, int] = (5, 8), quiz: float = 0.0,
                asked: tuple[int, int] = (2, 4)) -> Story:
    """One story from `seed`; `events` bounds how many optional events it holds.

    With probability `quiz` the story ends, as in a children's reader, with between
    `asked[0]` and `asked[1]` of its questions and their answers ("Who found the kite?
    Ben"), one per line, in random order.
    """
    rng = random.Random(seed)
    w = _Writer(rng)
    names = rng.sample(GIRLS, 2) + rng.sample(BOYS, 2)
    girls = {names[0], names[1]}
    hero_name, friend_name = rng.sample(names, 2)
    hero, friend = Person(hero_name, hero_name in girls), Person(friend_name, friend_name in girls)
    adult = rng.choice(ADULTS)
    pet_kind = rng.choice(list(PETS))
    pet = rng.choice(PETS[pet_kind])
    place, place2 = rng.sample(list(PLACES), 2)
    obj, obj2 = rng.sample(OBJECTS, 2)
    color, color2 = rng.sample(COLORS, 2)

    # --- opening: who, how old, when, where
    age = _number(rng, rng.randint(4, 10))
    weather, time = rng.choice(WEATHER), rng.choice(TIMES)
    opening = rng.randrange(3)
    if opening == 0:
        w.say(f"Once upon a time, there was a {hero.kind} named {hero.name}.", f"{_cap(hero.he)} was {age} years old.")
    elif opening == 1:
        w.say(f"{hero.name} was {_a(age)}-year-old {hero.kind} who loved to play outside.")
    else:
        w.say(f"{hero.name} was {age} years old, and {hero.he} lived in a small house with {hero.his} family.")
    w.ask(f"How old was {hero.name}?", age)
    w.say(w.pick([f"It was a {weather} {time}.", f"One {weather} {time}, {hero.name} woke up early."]))
    w.ask("What was the weather like?", weather)

    has_pet = rng.random() < 0.6
    if has_pet:
        w.say(w.pick([f"{hero.name} had a {pet_kind} named {pet}.",
                      f"{_cap(hero.his)} {pet_kind}, {pet}, went everywhere with {hero.him}."]))
        w.ask(f"What was the name of {hero.name}'s {pet_kind}?", pet)
        w.ask(f"What kind of pet did {hero.name} have?", pet_kind)

    here = PLACES[place]
    w.say(w.pick([f"{adult} took {hero.name} {here.to}.",
                  f"{hero.name} went {here.to}.",
                  f"{hero.name} walked {here.to} with {adult}."]))
    w.ask(f"Where did {hero.name} go first?", place)

    # --- the find
    w.paragraph()
    spot = rng.choice(here.spots)
    w.say(w.pick([f"{_cap(here.at)}, {hero.name} found {_a(color)} {obj} {spot}.",
                  f"{hero.name} looked {spot} and found {_a(color)} {obj}.",
                  f"There, {spot}, {hero.name} found {_a(color)} {obj}."]))
    w.ask(f"Who found the {obj}?", hero.name)
    w.ask(f"What did {hero.name} find?", obj)
    w.ask(f"What color was the {obj}?", color)
    w.ask(f"Where did {hero.name} find the {obj}?", place)
    w.say(w.pick([f'"Look, {_a(color)} {obj}!" {hero.name} {rng.choice(SAY)}.',
                  f'"What a nice {obj}," {hero.name} {rng.choice(SAY)}.',
                  f'"I will keep this {obj} safe," {hero.name} said.']))

    # --- optional events, in story order
    optional = ["friend", "count", "give", "snack", "lost", "home"]
    n_events = rng.randint(*events)
    chosen = set(rng.sample(optional, min(n_events, len(optional))))
    if "lost" in chosen and not has_pet:
        chosen.discard("lost")
    friend_here = "friend" in chosen or "give" in chosen or "lost" in chosen

    if friend_here:
        w.paragraph()
        w.say(w.pick([f"Then {hero.his} friend {friend.name} came running.",
                      f"Soon {friend.name}, a {friend.kind} from next door, came to play.",
                      f"Just then, {hero.name} saw {hero.his} friend {friend.name}."]))
        w.ask(f"Who came to play with {hero.name}?", friend.name)
        w.say(w.pick([f'"What is that?" asked {friend.name}.', f'"Can I see it?" asked {friend.name}.']),
              w.pick([f'"It is a {obj}. I found it {spot}," said {hero.name}.',
                      f'"It is my new {color} {obj}," said {hero.name}.']))

    if "count" in chosen:
        animals = rng.choice(list(ANIMALS))
        n = _number(rng, rng.randint(2, 12))
        who = f"{hero.name} and {friend.name}" if friend_here else hero.name
        w.say(w.pick([f"{who} saw {n} {animals} {ANIMALS[animals]}.",
                      f"Later, {who} counted {n} {animals} {ANIMALS[animals]}."]))
        w.ask(f"How many {animals} did {who} see?", n)

    if "give" in chosen:
        w.say(w.pick([f"{hero.name} gave the {obj} to {friend.name}.",
                      f"{hero.name} was kind and gave the {obj} to {friend.name}."]),
              f'"Thank you!" {friend.name} {rng.choice(SAY)}.')
        w.ask(f"Who did {hero.name} give the {obj} to?", friend.name)
        w.ask(f"Who gave the {obj} to {friend.name}?", hero.name)

    if "snack" in chosen:
        snack = rng.choice(SNACKS)
        a, b = rng.randint(2, 6), rng.randint(1, 5)
        a_text, b_text, total = _number(rng, a), _number(rng, b), _number(rng, a + b)
        giver = friend.name if friend_here else adult
        w.paragraph()
        gave = f"{giver} gave {hero.him} {b_text} more, so now {hero.he} had {total} {snack}."
        w.say(f"At lunch, {hero.name} had {a_text} {snack}.", gave)
        w.ask(f"How many {snack} did {hero.name} have in the end?", total)
        w.ask(f"How many {snack} did {giver} give {hero.name}?", b_text, stated_in=gave)

    if "lost" in chosen:
        there = PLACES[place2]
        spot2 = rng.choice(there.spots)
        w.paragraph()
        w.say(f"After that, they went {there.to}.",
              f"{_cap(there.at)}, {friend.name} lost {friend.his} {color2} {obj2}.",
              f'"Oh no, where is my {obj2}?" {friend.he} cried.',
              w.pick([f"{pet} the {pet_kind} found it {spot2}.",
                      f"{pet} looked everywhere and found the {obj2} {spot2}."]))
        w.ask(f"Who found the {obj2}?", pet)
        w.ask(f"What did {friend.name} lose?", obj2)
        w.ask(f"What color was the {obj2}?", color2)
        w.ask(f"Where did {friend.name} lose the {obj2}?", place2)

    if "home" in chosen:
        w.paragraph()
        w.say(f"When {hero.name} got home, {adult} asked, \"Where did you find that {obj}?\"",
              f'"{_cap(here.at)}!" said {hero.name}.' if "give" not in chosen else
              f'"{_cap(here.at)}, but I gave it to {friend.name}," said {hero.name}.')

    feeling = rng.choice(FEELINGS)
    w.say(w.pick([f"At the end of the day, {hero.name} was very {feeling}.",
                  f"{hero.name} went to bed {feeling} and dreamed of the {color} {obj}.",
                  f"It was a good day, and {hero.name} felt {feeling}."]))
    w.ask(f"How did {hero.name} feel at the end of the day?", feeling)
    text = w.text()
    if rng.random() < quiz:
        quiz_lines = rng.sample(w.questions, min(rng.randint(*asked), len(w.questions)))
        text += QUIZ_HEADER + "\n".join(f"{q} {a}" for q, a in quiz_lines)
    return Story(text, w.questions, w.sentences, w.evidence())


def reading_drills(story: Story, seed: str, n: int, context: int = 2) -> list[str]:
    """`n` short passages cut from `story`, each followed by one question it answers, in
    the pretraining format (`drill_passages`)."""
    return [drill_text(*drill) for drill in drill_passages(story, seed, n, context)]


def drill_text(passage: str, question: str, answer: str) -> str:
    """A drill in the pretraining format: the passage, the quiz header, the question and answer."""
    return passage + QUIZ_HEADER + f"{question} {answer}"


def drill_passages(story: Story, seed: str, n: int, context: int = 2) -> list[tuple[str, str, str]]:
    """(passage, question, answer) for `n` of `story`'s questions, chosen at random.

    A passage is the sentences that state the answer (`Story.evidence`) with up to
    `context` of their neighbours, so the answer is a few dozen tokens back rather than a
    few hundred: with attention spread evenly over fewer keys, the gradient that would
    teach a query to find the fact is less diluted. docs/finetune.md has what they did
    (and did not) teach the small preset.
    """
    rng = random.Random(seed)
    drills = []
    for k in rng.sample(range(len(story.questions)), min(n, len(story.questions))):
        question, answer = story.questions[k]
        first, last = story.evidence[k][0], story.evidence[k][-1]
        extra = rng.randint(0, context)
        before = rng.randint(0, extra)
        around = set(range(max(0, first - before), first)) | set(range(last + 1, last + 1 + extra - before))
        chosen = sorted(around.intersection(range(len(story.sentences))) | set(story.evidence[k]))
        drills.append((" ".join(story.sentences[i] for i in chosen), question, answer))
    return drills
