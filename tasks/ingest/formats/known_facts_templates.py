"""Question and sentence paraphrases of the known-facts relations (v2), and the grammar shared with v1.

Per Wikidata relation three questions ("{s}" is the subject) and three declarative sentences ("{s}" subject,
"{o}" object, "{a}" the object's indefinite article). The first wording of each is v1's. Every sentence
template differs from every other one, across relations too, so that one text never states two relations
(and so never carries two truth labels); tests/test_known_facts_v2.py checks it.
"""

from __future__ import annotations

Q, S = "q", "s"  # template id kinds: "<relation>.q<i>" / "<relation>.s<i>"

PARAPHRASES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "P101": (("What field does {s} work in?", "In which field is {s} active?", "What is the field of work of {s}?"),
             ("{s} works in the field of {o}.", "The field of work of {s} is {o}.", "{s} is active in the field of {o}.")),
    "P103": (("What is the native language of {s}?", "What is the mother tongue of {s}?",
              "Which language did {s} grow up speaking?"),
             ("The native language of {s} is {o}.", "The mother tongue of {s} is {o}.",
              "{s} grew up speaking {o} as a first language.")),
    "P106": (("What is the profession of {s}?", "What does {s} do for a living?", "What is the occupation of {s}?"),
             ("{s} works as {a} {o}.", "By profession, {s} is {a} {o}.", "{s} earns a living as {a} {o}.")),
    "P108": (("Who is the employer of {s}?", "Which organization employs {s}?", "Who does {s} work for?"),
             ("{s} is employed by {o}.", "The employer of {s} is {o}.", "{s} works for {o}.")),
    "P127": (("Who owns {s}?", "Who is the owner of {s}?", "Who has ownership of {s}?"),
             ("{s} is owned by {o}.", "The owner of {s} is {o}.", "{s} is the property of {o}.")),
    "P1303": (("What instrument does {s} play?", "Which musical instrument does {s} play?",
               "What is the instrument of {s}?"),
              ("{s} plays the {o}.", "The instrument played by {s} is the {o}.", "{s} is known for playing the {o}.")),
    "P131": (("In which administrative region is {s} located?", "Which administrative unit contains {s}?",
              "In what region does {s} lie?"),
             ("{s} is located within {o}.", "{s} lies in the administrative region of {o}.",
              "The administrative region containing {s} is {o}.")),
    "P136": (("What genre is {s} associated with?", "What is the genre of {s}?", "Which genre does {s} belong to?"),
             ("The genre of {s} is {o}.", "{s} belongs to the genre of {o}.", "{s} is associated with the genre {o}.")),
    "P138": (("What is {s} named after?", "Who or what gave {s} its name?", "After whom or what is {s} named?"),
             ("{s} is named after {o}.", "{s} takes its name from {o}.", "The name of {s} comes from {o}.")),
    "P140": (("What religion is {s} associated with?", "What is the religion of {s}?", "Which faith does {s} follow?"),
             ("{s} is associated with the religion of {o}.", "The religion of {s} is {o}.",
              "{s} follows the faith of {o}.")),
    "P1412": (("What language does {s} speak?", "Which language is spoken by {s}?",
               "In which language does {s} communicate?"),
              ("{s} speaks {o}.", "{s} is a speaker of {o}.", "{s} communicates in {o}.")),
    "P159": (("Where is {s} headquartered?", "Where are the headquarters of {s}?", "In which city is {s} based?"),
             ("{s} is headquartered in {o}.", "The headquarters of {s} are in {o}.", "{s} has its head office in {o}.")),
    "P17": (("In which country is {s} located?", "Which country is {s} in?", "What country does {s} belong to?"),
            ("{s} is located in the country of {o}.", "The country of {s} is {o}.",
             "{s} is situated in the country {o}.")),
    "P176": (("Which company produces {s}?", "Who manufactures {s}?", "What is the manufacturer of {s}?"),
             ("{s} is produced by {o}.", "The manufacturer of {s} is {o}.", "{s} is manufactured by {o}.")),
    "P178": (("Who developed {s}?", "Which company is the developer of {s}?", "Who is responsible for developing {s}?"),
             ("{s} was developed by {o}.", "The developer of {s} is {o}.", "{s} was created and developed by {o}.")),
    "P19": (("Where was {s} born?", "What is the birthplace of {s}?", "In which place was {s} born?"),
            ("{s} was born in {o}.", "The birthplace of {s} is {o}.", "{s} came into the world in {o}.")),
    "P20": (("Where did {s} die?", "What is the place of death of {s}?", "In which place did {s} pass away?"),
            ("{s} died in {o}.", "The place of death of {s} is {o}.", "{s} passed away in {o}.")),
    "P27": (("Which country is {s} a citizen of?", "What is the citizenship of {s}?",
             "Of which country does {s} hold citizenship?"),
            ("{s} is a citizen of {o}.", "{s} holds citizenship of {o}.", "The country of citizenship of {s} is {o}.")),
    "P276": (("Where is {s} located?", "What is the location of {s}?", "Where can {s} be found?"),
             ("{s} is located in {o}.", "The location of {s} is {o}.", "{s} can be found in {o}.")),
    "P30": (("On which continent is {s} located?", "Which continent is {s} part of?",
             "What continent does {s} belong to?"),
            ("{s} is part of the continent of {o}.", "{s} lies on the continent of {o}.", "The continent of {s} is {o}.")),
    "P36": (("What is the capital of {s}?", "Which city is the capital of {s}?",
             "What city serves as the capital of {s}?"),
            ("The capital of {s} is {o}.", "The capital city of {s} is {o}.", "{s} has {o} as its capital.")),
    "P364": (("What is the original language of {s}?", "In which language was {s} originally made?",
              "What language was {s} originally produced in?"),
             ("The original language of {s} is {o}.", "{s} was originally made in {o}.",
              "{s} was first produced in the {o} language.")),
    "P37": (("What is the official language of {s}?", "Which language is official in {s}?",
             "What language has official status in {s}?"),
            ("The official language of {s} is {o}.", "{s} has {o} as its official language.",
             "In {s}, the official language is {o}.")),
    "P39": (("What position does {s} hold?", "Which office does {s} hold?", "What post has {s} held?"),
            ("{s} holds the position of {o}.", "{s} has served in the office of {o}.", "The office held by {s} is {o}.")),
    "P407": (("What language is {s} written in?", "In which language was {s} written?", "What is the language of {s}?"),
             ("{s} is written in {o}.", "The language of {s} is {o}.", "{s} was composed in the {o} language.")),
    "P413": (("What position does {s} play?", "In which position does {s} play?",
              "What is the playing position of {s}?"),
             ("{s} plays as {a} {o}.", "The playing position of {s} is {o}.", "On the field, {s} plays as {a} {o}.")),
    "P449": (("Which network did {s} originally air on?", "What network first broadcast {s}?",
              "On which channel did {s} originally premiere?"),
             ("{s} originally aired on {o}.", "{s} was first broadcast by {o}.", "The original network of {s} is {o}.")),
    "P463": (("What organization is {s} a member of?", "Which organization counts {s} as a member?",
              "What group does {s} belong to?"),
             ("{s} is a member of {o}.", "{s} belongs to the organization {o}.", "{s} holds membership in {o}.")),
    "P495": (("Which country does {s} come from?", "What is the country of origin of {s}?",
              "Where does {s} originate?"),
             ("{s} comes from {o}.", "The country of origin of {s} is {o}.", "{s} originated in {o}.")),
    "P641": (("What sport does {s} play?", "Which sport is {s} associated with?", "In which sport does {s} compete?"),
             ("{s} plays {o} professionally.", "The sport of {s} is {o}.", "{s} competes in the sport of {o}.")),
    "P740": (("Where was {s} founded?", "In which place was {s} formed?", "What is the place of formation of {s}?"),
             ("{s} was founded in {o}.", "{s} was formed in {o}.", "The place where {s} was founded is {o}.")),
    "P937": (("In which city did {s} work?", "Where did {s} work?", "What was the work location of {s}?"),
             ("{s} worked in the city of {o}.", "The work location of {s} was {o}.",
              "{s} was professionally active in {o}.")),
}


def article(word: str) -> str:
    """Indefinite article for a common noun ("an actor", "a pitcher")."""
    return "an" if word[:1].lower() in "aeiou" else "a"


def sentence_start(text: str) -> str:
    """Capitalise a sentence that opens with a lower-case common noun ("samurai cinema"), not "iPhone"."""
    first = text.split(" ", 1)[0]
    if first[:1].islower() and not any(c.isupper() for c in first):
        return text[0].upper() + text[1:]
    return text


def fill_sentence(template: str, subject: str, obj: str) -> str:
    """A declarative template filled in (no doubled period after "S.p.A.")."""
    text = template.format(s=subject, o=obj, a=article(obj))
    if text.endswith("..") and obj.endswith("."):
        text = text[:-1]
    return sentence_start(text)


def template_ids(relation_id: str, kind: str) -> list[str]:
    """The ids of a relation's question (kind Q) or sentence (kind S) wordings, in table order."""
    n = len(PARAPHRASES[relation_id][0 if kind == Q else 1])
    return [f"{relation_id}.{kind}{i}" for i in range(n)]


def _template(template_id: str) -> str:
    """The wording of a template id."""
    relation_id, rest = template_id.rsplit(".", 1)
    return PARAPHRASES[relation_id][0 if rest[0] == Q else 1][int(rest[1:])]


def render_sentence(template_id: str, subject: str, obj: str) -> str:
    """The sentence of wording `template_id` stating `subject relation obj`."""
    return fill_sentence(_template(template_id), subject, obj)


def render_question(template_id: str, subject: str) -> str:
    """The question of wording `template_id` about `subject`."""
    return sentence_start(_template(template_id).format(s=subject))
