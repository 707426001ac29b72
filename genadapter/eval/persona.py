"""Multi-session conversations in which a user reveals facts about themselves among small talk
(the MSC analog), and questions the user later asks about those facts. All generated from a seed."""

from __future__ import annotations

import random

from .data import Example, Question
from .fictional import NameMaker

JOBS = "nurse carpenter librarian beekeeper pharmacist translator baker architect".split()
PETS = "dog cat parrot tortoise rabbit ferret".split()
FOODS = ["lentil soup", "mushroom risotto", "fish tacos", "apple pie", "pad thai", "dumplings"]
HOBBIES = ["rock climbing", "knitting", "playing the cello", "chess", "pottery", "sailing"]
ALLERGIES = ["peanuts", "shellfish", "pollen", "strawberries", "penicillin", "sesame"]
SMALL_TALK = [
    (
        "How do I keep basil alive on a windowsill?",
        "Give it plenty of light and water it when the top of the soil feels dry.",
    ),
    (
        "Any tips for sleeping better?",
        "Try keeping a regular bedtime and avoiding screens late in the evening.",
    ),
    (
        "What's a good book for a long train ride?",
        "A collection of short stories works well, since you can stop at any point.",
    ),
    (
        "Is it worth learning to cook with a pressure cooker?",
        "Yes, it saves a lot of time for beans, stews and stocks.",
    ),
    ("How long should I boil an egg?", "About seven minutes gives a firm white and a soft yolk."),
    (
        "What should I pack for a weekend hike?",
        "Water, a map, layers, snacks and a small first aid kit.",
    ),
]
ACKS = [
    "That's good to know, thanks for telling me.",
    "Thanks for sharing that!",
    "Noted. I hope your week goes well.",
    "That sounds nice.",
]


def _user(rng: random.Random, names: NameMaker) -> list[tuple[str, str, list[str]]]:
    """(what the user says, the question asked later, acceptable answers) per fact."""
    name = names.word(2).title()
    town = names.place()
    job, food = rng.choice(JOBS), rng.choice(FOODS)
    pet, pet_name = rng.choice(PETS), names.word(2).title()
    sibling, sibling_name = rng.choice(["sister", "brother"]), names.word(2).title()
    hobby, allergy = rng.choice(HOBBIES), rng.choice(ALLERGIES)
    facts = [
        (f"Hi, I'm {name}.", "What is my name?", [name]),
        (
            f"I work as a {job}, so my hours are all over the place.",
            "What do I do for a living?",
            [job],
        ),
        (
            f"My {pet} {pet_name} kept me up half the night.",
            f"What is my {pet}'s name?",
            [pet_name],
        ),
        (
            f"My {sibling} {sibling_name} is coming to visit next week.",
            f"What is my {sibling}'s name?",
            [sibling_name],
        ),
        (f"Nothing beats {food} after a long day.", "What is my favourite food?", [food]),
        (f"I've been really into {hobby} lately.", "What hobby have I been into lately?", [hobby]),
        (
            f"I'm allergic to {allergy}, so I check every label.",
            "What am I allergic to?",
            [allergy],
        ),
    ]
    if rng.random() < 0.5:
        new_town = names.place()
        facts.append(
            (
                f"Big news: I just moved from {town} to {new_town}!",
                "Which town do I live in now?",
                [new_town],
            )
        )
    else:
        facts.append(
            (
                f"I live in {town}, where it rains most of the year.",
                "Which town do I live in now?",
                [town],
            )
        )
    return facts


def persona_examples(n: int, questions_per_user: int, seed: int) -> list[Example]:
    """n users; each one's conversation is a few sessions (one document each) in which every fact
    is said once, in order, between small-talk exchanges."""
    rng = random.Random(f"persona:{seed}")
    names = NameMaker(rng)
    examples = []
    for i in range(n):
        facts = _user(rng, names)
        sessions = rng.randint(3, 4)
        turns: list[list[str]] = [[] for _ in range(sessions)]
        # The name comes first; the rest land in random sessions, in order.
        places = sorted(rng.randrange(sessions) for _ in facts[1:])
        for (said, _, _), where in zip(facts, [0, *places]):
            turns[where].append(f"User: {said}\nAssistant: {rng.choice(ACKS)}")
        for t in turns:
            ask, reply = rng.choice(SMALL_TALK)
            t.insert(rng.randint(0, len(t)), f"User: {ask}\nAssistant: {reply}")
        documents = [f"Session {k + 1}:\n" + "\n".join(t) for k, t in enumerate(turns)]
        picked = rng.sample(facts, min(questions_per_user, len(facts)))
        questions = [Question(q, answers) for _, q, answers in picked]
        examples.append(Example(f"persona-{seed}-{i}", documents, questions))
    return examples
