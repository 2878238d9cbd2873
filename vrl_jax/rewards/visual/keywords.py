"""Keyword sets for DyME's lexical thinking reward: the lemmas of a text's content words.

DyME's released run (``RewardCalculatorLocal`` in ``reward_utils/checker.py``) runs spaCy's
``en_core_web_sm`` on the lower-cased text and keeps the ``lemma_`` of every token whose ``pos_`` is
NOUN, PROPN, VERB, ADJ or NUM and that is neither a stop word nor punctuation. Two extractors give
that set here, chosen by name (``EXTRACTORS``):

- ``spacy``: exactly that, with an installed spaCy pipeline (``en_core_web_sm`` by default; it is not
  on PyPI, install it with ``python -m spacy download en_core_web_sm``).
- ``approx``: an offline approximation with no model. It tokenises like spaCy's English tokenizer
  (the cases that matter for content words: hyphens between letters split, ``%``, ``$`` and
  clitics split off, decimals and thousands separators kept), drops spaCy's English stop words,
  and takes lemma and part of speech from ``lemminflect``'s dictionary, which lists every part of
  speech a word can have: a word that can only be an adverb (``approximately``), or is a function
  word spaCy does not list as a stop word (``versus``), is dropped; a number is kept as written; an
  unknown word is kept as a proper noun would be (as written). Without a tagger it cannot tell
  ``rose`` the flower from ``rose`` the verb from context: an inflected verb form prefers the verb
  lemma, anything else the noun's. ``benchmarks/lexical_agreement.py`` measures how close it is:
  on ChartQA-style rationales its thinking reward is within 0.005 of spaCy's on average (max
  0.08, Pearson r 0.999), and the group-normalised advantages have the same sign in 99.7% of rows.

``make_extractor("auto")`` takes spaCy when the model loads and the approximation otherwise; the
extractor's ``name`` says which ran (``spacy:en_core_web_sm-3.8.0``, ``approx:lemminflect-0.2.3``).
"""
from __future__ import annotations

import functools
import importlib.metadata
import re
from collections.abc import Iterable
from typing import Protocol, runtime_checkable

CONTENT_POS = frozenset({"NOUN", "PROPN", "VERB", "ADJ", "NUM"})  # DyME's important_pos_tags

# spaCy 3.8's English stop words (spacy/lang/en/stop_words.py, MIT licence, (c) Explosion AI), so
# the approximation drops what spaCy's `is_stop` drops without installing spaCy. spaCy checks the
# token's lower-cased text, not its lemma: "show" is a stop word, "shows" is not.
SPACY_STOP_WORDS = frozenset("""
a about above across after afterwards again against all almost alone along already also although
always am among amongst amount an and another any anyhow anyone anything anyway anywhere are around
as at back be became because become becomes becoming been before beforehand behind being below
beside besides between beyond both bottom but by call can cannot ca could did do does doing done
down due during each eight either eleven else elsewhere empty enough even ever every everyone
everything everywhere except few fifteen fifty first five for former formerly forty four from front
full further get give go had has have he hence her here hereafter hereby herein hereupon hers
herself him himself his how however hundred i if in indeed into is it its itself just keep last
latter latterly least less made make many may me meanwhile might mine more moreover most mostly move
much must my myself name namely neither never nevertheless next nine no nobody none noone nor not
nothing now nowhere of off often on once one only onto or other others otherwise our ours ourselves
out over own part per perhaps please put quite rather re really regarding same say see seem seemed
seeming seems serious several she should show side since six sixty so some somehow someone something
sometime sometimes somewhere still such take ten than that the their them themselves then thence
there thereafter thereby therefore therein thereupon these they third this those though three
through throughout thru thus to together too top toward towards twelve twenty two under unless until
up upon us used using various very via was we well were what whatever when whence whenever where
whereafter whereas whereby wherein whereupon wherever whether which while whither who whoever whole
whom whose why will with within without would yet you your yours yourself yourselves
'd 'll 'm 're 's 've n't ‘d ‘ll ‘m ‘re ‘s ‘ve ’d ’ll ’m ’re ’s ’ve n‘t n’t
""".split())

# Words the approximation drops although lemminflect lists a content tag for them (or does not know
# them, so they would pass as unknown names): function words spaCy tags ADP / CCONJ / DET / X and does
# not list as stop words, and words it tags ADV or INTJ in chart rationales ("overall, the values
# rose", "revenue worldwide", "yeah").
NOT_CONTENT = frozenset("""
vs versus etc eg ie minus despite unlike till upto ok okay yes yeah oh hmm overall worldwide later
""".split())

NUM_WORDS = frozenset("""
zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen
seventeen eighteen nineteen twenty thirty forty fifty sixty seventy eighty ninety hundred thousand
million billion trillion quadrillion quintillion
""".split())

_CLITIC = re.compile(r"\b[^\W\d_]+n['’‘]t\b|['’‘](?:s|re|ve|ll|d|m)\b")  # "don't" (AUX), "'s" (stop)
_ABBREVIATION = re.compile(r"(?<![^\W\d_])(?:[^\W\d_]\.){2,}")         # "u.s.", "e.g."
_TOKEN = re.compile(
    r"(?:(?<![^\s(\[])-)?\d+(?:[.,]\d+)*(?:st|nd|rd|th|s)?(?![^\W_]|[.,]\d)"  # 2017, -1.5, 1,234, 3rd
    r"|\d+(?:[.,]\d+)*(?=[^\W\d_])"                   # 37.4m, 5km: the unit is split off
    r"|[^\W_]+-\d+(?![^\W_])"                        # covid-19 (a hyphen before a digit stays)
    r"|[^\W_]+"                                      # words; "x-axis" -> x, axis as spaCy splits
    r"|(?<=[\d\s])\+(?=[\s\d])")                       # "5 + 7": spaCy tags this plus NUM
_NUMBER = re.compile(r"-?\d+(?:[.,]\d+)*(?:st|nd|rd|th|s)?")


@runtime_checkable
class KeywordExtractor(Protocol):
    """``extractor(text) -> frozenset`` of content-word lemmas; ``name`` says which implementation
    (and version) ran, for the run's metrics."""

    name: str

    def __call__(self, text: str) -> frozenset[str]: ...


def tokens(text: str) -> list[str]:
    """``text`` lower-cased and cut into the word and number tokens spaCy's tokenizer would give
    (punctuation, symbols and clitics dropped: none of them is a content word)."""
    text = _CLITIC.sub(" ", text.lower())
    out = []
    last = 0
    for m in _ABBREVIATION.finditer(text):
        out += _TOKEN.findall(text[last:m.start()])
        out.append(m.group(0))
        last = m.end()
    return out + _TOKEN.findall(text[last:])


@functools.lru_cache(maxsize=65536)
def approx_lemma(token: str) -> str | None:
    """The lemma DyME would keep for one lower-cased token, or None if it would drop it."""
    import lemminflect  # the approximation's one dependency (install_requires)

    if token in SPACY_STOP_WORDS or token in NOT_CONTENT:
        return None
    if _NUMBER.fullmatch(token) or token in NUM_WORDS or token == "+":
        return token  # NUM: spaCy's lemma of a number is the number as written
    if "." in token:
        return None if token in ("e.g.", "i.e.") else token  # "u.s.": PROPN
    lemmas = lemminflect.getAllLemmas(token)
    if not lemmas:
        return token  # unknown: a name (PROPN keeps its text) or a label such as "x"
    if not CONTENT_POS & set(lemmas):
        return None   # only ever an adverb (or another closed class)
    adj = lemmas.get("ADJ", (token,))[0]
    if adj != token and lemmas.get("NOUN", ("",))[0] != token:
        return adj    # a comparative or superlative ("lower", "highest"), not a noun ("number")
    verb = lemmas.get("VERB", (token,))[0]
    if verb != token and not token.endswith("s"):
        return verb   # a verb form other than the 3rd person: increased, rose, showing
    for pos in ("NOUN", "VERB", "ADJ", "PROPN"):
        if pos in lemmas:
            return lemmas[pos][0]
    return None


class ApproxExtractor:
    """The offline approximation (module docstring); deterministic and thread-safe."""

    def __init__(self):
        try:
            version = importlib.metadata.version("lemminflect")
        except importlib.metadata.PackageNotFoundError as err:
            raise ImportError("the 'approx' keyword extractor needs lemminflect "
                              "(pip install lemminflect)") from err
        self.name = f"approx:lemminflect-{version}"

    def __call__(self, text: str) -> frozenset[str]:
        return frozenset(lemma for lemma in map(approx_lemma, tokens(text)) if lemma is not None)


class SpacyExtractor:
    """DyME's extractor itself: ``nlp(text.lower())``, content POS, not stop, not punct, ``lemma_``.

    ``model`` is a spaCy pipeline name or path; loading it raises ``ImportError`` without spaCy and
    ``OSError`` without the model. The whole pipeline runs, as DyME loads it: in ``en_core_web_sm``
    the attribute ruler reads the parse, so without the parser "are" turns AUX -> VERB and
    "reasoning" VERB -> AUX (6 of 920 texts of ``benchmarks/lexical_agreement.py`` change)."""

    def __init__(self, model: str = "en_core_web_sm"):
        import spacy

        self.nlp = spacy.load(model)
        self.name = f"spacy:{self.nlp.meta.get('lang', 'xx')}_{self.nlp.meta.get('name', model)}-" \
                    f"{self.nlp.meta.get('version', '?')}"

    @staticmethod
    def _keep(doc) -> frozenset[str]:
        return frozenset(t.lemma_ for t in doc if t.pos_ in CONTENT_POS and not t.is_stop and not t.is_punct)

    def __call__(self, text: str) -> frozenset[str]:
        return self._keep(self.nlp(text.lower()))

    def many(self, texts: Iterable[str]) -> list[frozenset[str]]:
        return [self._keep(doc) for doc in self.nlp.pipe(t.lower() for t in texts)]


EXTRACTORS = {"spacy": SpacyExtractor, "approx": lambda model=None: ApproxExtractor()}
BACKENDS = ("auto", *EXTRACTORS)


def make_extractor(backend: str = "auto", spacy_model: str = "en_core_web_sm") -> KeywordExtractor:
    """The extractor named by ``backend``; ``"auto"`` is spaCy if ``spacy_model`` loads, else the
    approximation. Raises ``ImportError`` / ``OSError`` naming what to install when the named
    backend cannot run, ``ValueError`` for an unknown name."""
    if backend not in BACKENDS:
        raise ValueError(f"keyword backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "approx":
        return ApproxExtractor()
    try:
        return SpacyExtractor(spacy_model)
    except (ImportError, OSError) as err:
        if backend == "spacy":
            raise type(err)(f"the 'spacy' keyword backend needs spaCy and its pipeline {spacy_model!r} "
                            f"(pip install spacy && python -m spacy download en_core_web_sm): {err}") from err
    return ApproxExtractor()
