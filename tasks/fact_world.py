"""A generated world of facts about people, its training corpus and its cloze queries.

Everything is drawn from one ``torch.Generator`` seeded by ``seed``; nothing is downloaded.

* **Entities**: people with generated two-part names, each with one object per relation
  (birth city, employer, profession, birth year, native language, instrument).
* **Biographies**: short documents about one entity, each stating ``facts_per_doc`` of its
  facts; every fact is stated in ``docs_per_fact`` documents, each time with a different
  surface template. Other biographies of the same entity (other relations) and of other
  entities that share an object are the natural distractors.
* **Relation-prior documents**: lists of the objects of one relation ("Cities in the region
  include ...") that make an object likelier without stating any fact.
* **Queries**: one cloze prompt per sampled fact, in a template that none of that fact's
  documents uses (the template may state *other* facts in training, so the model can learn
  its form), with the object as the target; the **proponents** are the documents that state
  the fact. The **flipped** query of the same fact puts the object first and asks for the
  subject (Grosse et al. 2023, §5.3); every training template is subject-first, and no
  flipped prompt ends in a context that precedes a subject in training (e.g. "The employer
  of {s}"), so the flipped target is never a seen continuation of its prompt.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

ONSETS = ["b", "br", "c", "d", "dr", "f", "g", "h", "j", "k", "l", "m", "n", "p", "r", "s",
          "st", "t", "th", "v", "w", "z"]
VOWELS = ["a", "e", "i", "o", "u", "ai", "ea", "io"]
CODAS = ["", "n", "r", "l", "s", "th", "m", "nd", "rk", "x"]

OBJECTS = {
    "city": ["Arlen", "Brask", "Corvale", "Dunmere", "Eskwood", "Falmoor", "Glenhart", "Hollis",
             "Ivybridge", "Jarrow", "Kelmscot", "Lowmarsh", "Merrow", "Northam", "Oakvale",
             "Pellham", "Quarry", "Redstow", "Saltash", "Thornbury", "Umber", "Veldt",
             "Westmoor", "Yarrow"],
    "company": ["Acme", "Borealis", "Cinder", "Dynamo", "Everline", "Foxglove", "Granite",
                "Helix", "Ironwood", "Juniper", "Keystone", "Lumen", "Meridian", "Nimbus",
                "Orbital", "Paragon", "Quill", "Riverton", "Sterling", "Tandem"],
    "profession": ["architect", "baker", "carpenter", "dentist", "engineer", "farmer",
                   "geologist", "historian", "illustrator", "journalist", "lawyer", "mechanic",
                   "nurse", "optician", "pilot", "surgeon", "tailor", "violinist"],
    "year": [str(y) for y in range(1921, 1991, 3)],
    "language": ["Albish", "Brenic", "Calvan", "Dorran", "Esmeric", "Feltic", "Gorvish",
                 "Halan", "Istric", "Jorvic", "Kelvan", "Lunic"],
    "instrument": ["accordion", "banjo", "cello", "drums", "flute", "guitar", "harp",
                   "oboe", "piano", "trumpet", "ukulele", "viola"],
}

# relation -> (object kind, training templates (subject first), forward query prompts
# (one per training template: the query of a fact uses the one its documents do not), the
# flipped query prompt (object first, the subject is the target)).
RELATIONS = {
    "birth_city": ("city", [
        "{s} was born in {o} .",
        "{s} grew up in the town of {o} .",
        "The hometown of {s} is {o} .",
        "{s} comes from {o} , where the family lived for years .",
    ], "{o} was home to"),
    "employer": ("company", [
        "{s} works for {o} .",
        "{s} took a job at {o} after school .",
        "The employer of {s} is {o} .",
        "{s} is on the payroll of {o} .",
    ], "{o} employs"),
    "profession": ("profession", [
        "{s} is a {o} by trade .",
        "{s} trained for years to become a {o} .",
        "The profession of {s} is {o} .",
        "{s} earns a living as a {o} .",
    ], "A {o} by trade is"),
    "birth_year": ("year", [
        "{s} was a child of the year {o} .",
        "{s} has a birthday in {o} .",
        "The birth year of {s} is {o} .",
        "{s} came into the world in {o} .",
    ], "In {o} the newborn was"),
    "language": ("language", [
        "{s} speaks {o} at home .",
        "{s} learned {o} as a first language .",
        "The native language of {s} is {o} .",
        "{s} grew up speaking {o} .",
    ], "{o} is spoken by"),
    "instrument": ("instrument", [
        "{s} plays the {o} .",
        "{s} practises the {o} every evening .",
        "The instrument of {s} is the {o} .",
        "{s} performs on the {o} in a band .",
    ], "The {o} is played by"),
}

PRIOR_TEMPLATES = {
    "city": "Cities in the region include {objs} .",
    "company": "Large companies of the country are {objs} .",
    "profession": "Common professions are {objs} .",
    "year": "Years of the census were {objs} .",
    "language": "Languages spoken in the region include {objs} .",
    "instrument": "Instruments taught at the school are {objs} .",
}


@dataclass
class FactWorld:
    """The generated world.

    Attributes:
        names: ``[n_entities]`` entity names.
        facts: ``{(entity, relation): object}``.
        documents: training document texts ``[n_train]``.
        doc_facts: for each document, the facts ``(entity, relation)`` it states.
        queries: forward queries then flipped ones, each ``{prompt, target, proponents,
            set, fact}``.
    """

    names: list[str]
    facts: dict[tuple[int, str], str]
    documents: list[str] = field(default_factory=list)
    doc_facts: list[list[tuple[int, str]]] = field(default_factory=list)
    queries: list[dict] = field(default_factory=list)


def _choice(items: list, gen: torch.Generator):
    return items[int(torch.randint(len(items), (1,), generator=gen))]


def _names(n: int, gen: torch.Generator) -> list[str]:
    """``n`` distinct two-part names ("Dravin Korlath")."""

    def part(syllables: int) -> str:
        word = "".join(_choice(ONSETS, gen) + _choice(VOWELS, gen) for _ in range(syllables))
        return (word + _choice(CODAS, gen)).capitalize()

    out, seen = [], set()
    while len(out) < n:
        name = f"{part(2)} {part(2)}"
        if name not in seen:
            seen.add(name)
            out.append(name)
    return out


def _flip_prompt(relation: str, obj: str) -> str:
    return RELATIONS[relation][2].format(o=obj)


def _forward_prompt(relation: str, template_id: int, subject: str) -> str:
    template = RELATIONS[relation][1][template_id]
    return template.split("{o}")[0].format(s=subject).rstrip()


def generate(n_entities: int = 150, docs_per_fact: int = 3, facts_per_doc: int = 2,
             n_prior_docs: int = 60, n_queries: int = 100, seed: int = 0) -> FactWorld:
    """Generates a fact world (see module docstring).

    Args:
        n_entities: people in the world.
        docs_per_fact: documents stating each fact, each with another template (at most the
            number of templates minus one, so that one template is left for the query).
        facts_per_doc: facts of one entity stated per biography.
        n_prior_docs: relation-prior documents (lists of objects).
        n_queries: facts queried (each gives one forward and one flipped query).
        seed: the generator's seed.
    """
    n_templates = min(len(t[1]) for t in RELATIONS.values())
    if not 1 <= docs_per_fact < n_templates:
        raise ValueError(f"docs_per_fact must be in [1, {n_templates - 1}] so that one template "
                         f"is left for the query, got {docs_per_fact}")
    relations = list(RELATIONS)
    if not 1 <= facts_per_doc <= len(relations):
        raise ValueError(f"facts_per_doc must be in [1, {len(relations)}], got {facts_per_doc}")
    gen = torch.Generator().manual_seed(seed)
    names = _names(n_entities, gen)
    facts = {(e, r): _choice(OBJECTS[RELATIONS[r][0]], gen)
             for e in range(n_entities) for r in relations}
    # The template left for each fact's query; its documents use the others, one per copy.
    query_template = {f: int(torch.randint(n_templates, (1,), generator=gen)) for f in facts}
    world = FactWorld(names, facts)
    fact_docs: dict[tuple[int, str], list[int]] = {f: [] for f in facts}
    for e in range(n_entities):
        for copy in range(docs_per_fact):
            order = [relations[i] for i in torch.randperm(len(relations), generator=gen)]
            for start in range(0, len(order), facts_per_doc):
                sentences, stated = [], []
                for r in order[start:start + facts_per_doc]:
                    usable = [t for t in range(n_templates) if t != query_template[(e, r)]]
                    template = RELATIONS[r][1][usable[copy]]
                    sentences.append(template.format(s=names[e], o=facts[(e, r)]))
                    stated.append((e, r))
                for f in stated:
                    fact_docs[f].append(len(world.documents))
                world.documents.append(" ".join(sentences))
                world.doc_facts.append(stated)
    for _ in range(n_prior_docs):
        kind = _choice(list(PRIOR_TEMPLATES), gen)
        pool = OBJECTS[kind]
        picks = [pool[int(i)] for i in torch.randperm(len(pool), generator=gen)[:5]]
        world.documents.append(PRIOR_TEMPLATES[kind].format(objs=" , ".join(picks)))
        world.doc_facts.append([])
    # Shuffle documents so that a document's index says nothing about its entity.
    perm = torch.randperm(len(world.documents), generator=gen).tolist()
    inverse = {old: new for new, old in enumerate(perm)}
    world.documents = [world.documents[i] for i in perm]
    world.doc_facts = [world.doc_facts[i] for i in perm]
    fact_list = list(facts)
    picked = torch.randperm(len(fact_list), generator=gen)[:n_queries].tolist()
    for which in ("forward", "flipped"):
        for i in picked:
            e, r = fact_list[i]
            proponents = sorted(inverse[d] for d in fact_docs[(e, r)])
            if which == "forward":
                prompt = _forward_prompt(r, query_template[(e, r)], names[e])
                target = facts[(e, r)]
            else:
                prompt, target = _flip_prompt(r, facts[(e, r)]), names[e]
            world.queries.append({"prompt": prompt, "target": target, "proponents": proponents,
                                  "set": which, "fact": f"{names[e]}|{r}"})
    return world
