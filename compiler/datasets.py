"""Real data shipped inside PyPI packages, for examples, the demo and benchmarks (nothing downloaded).

- :func:`wikipedia_text` — articles of gensim's test dump of English Wikipedia
  (``enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2``), markup stripped
  with gensim's ``filter_wiki`` plus the cleanups below: held-out *evaluation* text.
- :func:`lee_text` — the Lee news corpus (``lee_background.cor``, 300 Australian news
  stories): *calibration* text, a different source from the evaluation text.
- :func:`photos` — scikit-image's bundled photographs as HWC uint8 RGB, in two disjoint sets:
  ``"evaluation"`` (astronaut, chelsea, coffee, rocket) and ``"calibration"`` (the others;
  grayscale ones are stacked to RGB), so fidelity is never measured on calibration images.
- :func:`photo_variants` — ``n`` images: the photos themselves, then random crops (each side
  ``f ~ U(0.6, 1)`` of the original, uniform position) flipped left-right with probability ½.
- :func:`photo_dataset` — those variants as :class:`slimc.data.Images`, which ``slimc.data.load``
  resizes and normalizes with the model's own preprocessing.
- :func:`digits` — scikit-learn's 8×8 handwritten digits ``(X [1797, 64] float32, y int64)``.

Each source is imported lazily; a missing package raises a `DataError` naming the pip command.
"""

from __future__ import annotations

import bz2
import importlib
import importlib.util
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from slimc.data_images import Images
from slimc.errors import DataError

WIKI_DUMP = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
LEE_CORPUS = "lee_background.cor"
EVALUATION_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket")
CALIBRATION_PHOTOS = (
    "immunohistochemistry", "hubble_deep_field", "retina", "motorcycle_left", "motorcycle_right",
    "camera", "coins", "moon", "clock", "brick", "grass", "gravel",
)
# Sections that hold citations and link lists, not prose: an article is cut at the first one.
_TAIL_SECTIONS = re.compile(
    r"^=+\s*(References|External links|See also|Further reading|Notes|Bibliography|Sources|Citations)\s*=+\s*$",
    re.I | re.M,
)
_HEADING = re.compile(r"^(=+)\s*(.*?)\s*\1\s*$", re.M)


def _import(module: str, pip_name: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError:
        raise DataError(f"this data set needs {pip_name}: pip install {pip_name}") from None


def _gensim_file(name: str) -> Path:
    """A file of gensim's test data, found without importing gensim (slow to import)."""
    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("this data set ships with gensim's test data: pip install gensim")
    path = Path(next(iter(spec.submodule_search_locations))) / "test" / "test_data" / name
    if not path.is_file():
        raise DataError(f"gensim is installed but {path} is missing; reinstall it: pip install --force-reinstall gensim")
    return path


def _clean_article(markup: str, filter_wiki: Any) -> str:
    """Plain prose of one article: filtered markup, no bold/italic quotes, headings as lines."""
    text = filter_wiki(markup)
    tail = _TAIL_SECTIONS.search(text)
    text = text[: tail.start()] if tail else text
    text = _HEADING.sub(r"\2", text).replace("'''", "").replace("''", "")
    lines = [line.strip() for line in text.splitlines()]
    lines = [line for line in lines if line not in ("*", "#", ":", ";")]  # bullets whose link was stripped
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def wikipedia_articles() -> Iterator[tuple[str, str]]:
    """(title, plain text) of each article in the dump, in dump order; redirects skipped."""
    wikicorpus = _import("gensim.corpora.wikicorpus", "gensim")
    with bz2.open(_gensim_file(WIKI_DUMP)) as dump:
        for title, markup, _page_id in wikicorpus.extract_pages(dump):
            if ":" in title or markup.lstrip()[:9].upper() == "#REDIRECT":
                continue
            text = _clean_article(markup, wikicorpus.filter_wiki)
            if text:
                yield title, text


def _cut(text: str, limit: int) -> str:
    """``text`` cut to at most ``limit`` chars at a paragraph (else sentence) boundary."""
    if len(text) <= limit:
        return text
    head = text[:limit]
    end = head.rfind("\n\n")
    end = end if end > limit // 2 else head.rfind(". ") + 1
    return head[:end].rstrip() if end > 0 else head


def wikipedia_text(max_chars: int | None = 50_000, per_article: int | None = 3_000) -> str:
    """The opening of each article (title line, then up to ``per_article`` chars of text) until
    ``max_chars`` in all; ``None`` lifts a limit (all ~100 articles in full: about 3 MB).

    Openings of many articles give more varied text than one long article; the defaults, about
    11 k MiniLM tokens (~90 windows of 128) from ~17 articles, keep CPU evaluation short.
    """
    parts: list[str] = []
    used = 0
    for title, text in wikipedia_articles():
        if title.startswith("List of") or title.endswith("(disambiguation)"):
            continue  # link lists, not prose
        article = f"{title}\n\n{_cut(text, per_article) if per_article else text}\n\n"
        if max_chars is not None and used + len(article) > max_chars:
            if not parts:
                parts.append(_cut(article, max_chars))
            break
        parts.append(article)
        used += len(article)
    return "".join(parts).strip() + "\n"


def lee_text() -> str:
    """The Lee background corpus: one news story per line."""
    return _gensim_file(LEE_CORPUS).read_text(encoding="utf-8", errors="replace")


def text_files(folder: str | Path) -> tuple[Path, Path]:
    """``(calibration, evaluation)`` text files in ``folder``, written once: the Lee news corpus
    and held-out Wikipedia articles (the demo's and the fidelity tools' text data)."""
    folder = Path(folder)
    lee, wiki = folder / "lee_background.txt", folder / "wikipedia.txt"
    if not lee.exists():
        write_text(lee, lee_text())
    if not wiki.exists():
        write_text(wiki, wikipedia_text())
    return lee, wiki


def write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` as UTF-8 (creating folders) so the CLI can take it as ``--calib``/``--eval``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def _photo(name: str, skdata: Any) -> np.ndarray:
    if name.startswith("motorcycle_"):
        left, right, _disparity = skdata.stereo_motorcycle()
        image = left if name.endswith("left") else right
    else:
        image = getattr(skdata, name)()
    image = np.asarray(image)
    if image.ndim == 2:  # grayscale: the same picture in all three channels
        image = np.repeat(image[..., None], 3, axis=2)
    return np.ascontiguousarray(image[..., :3]).astype(np.uint8)


def photos(split: str | None = "evaluation") -> list[np.ndarray]:
    """scikit-image's photos as HWC uint8 RGB: ``"evaluation"``, ``"calibration"`` or None (all)."""
    sets = {"evaluation": EVALUATION_PHOTOS, "calibration": CALIBRATION_PHOTOS, None: EVALUATION_PHOTOS + CALIBRATION_PHOTOS}
    if split not in sets:
        raise DataError(f"unknown photo split {split!r}: use 'evaluation', 'calibration' or None.")
    skdata = _import("skimage.data", "scikit-image")
    return [_photo(name, skdata) for name in sets[split]]


def photo_variants(n: int, seed: int = 0, split: str | None = "evaluation") -> list[np.ndarray]:
    """``n`` images: the photos of ``split`` first, then seeded random crops and flips of them."""
    base = photos(split)
    rng = np.random.default_rng(seed)
    out = base[:n]
    while len(out) < n:
        image = base[len(out) % len(base)]
        h, w = image.shape[:2]
        f = rng.uniform(0.6, 1.0)
        ch, cw = max(1, round(h * f)), max(1, round(w * f))
        top, left = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
        crop = image[top:top + ch, left:left + cw]
        out.append(np.ascontiguousarray(crop[:, ::-1] if rng.random() < 0.5 else crop))
    return out


def photo_dataset(size: int | tuple[int, int] = 224, n: int = 32, seed: int = 0, split: str | None = "evaluation") -> Images:
    """``n`` photo variants, preprocessed by ``slimc.data.load`` with the model's own size and
    normalization (``size`` is used only when the model states none)."""
    hw = (size, size) if isinstance(size, int) else tuple(size)
    source = f"scikit-image photos ({split or 'all'}), crops and flips (seed {seed})"
    return Images(photo_variants(n, seed, split), source, size=hw)


def write_images(folder: str | Path, images: Sequence[np.ndarray], prefix: str = "photo") -> Path:
    """Save HWC uint8 images as PNGs (``photo_000.png`` ...) so the CLI can take the folder."""
    pil = _import("PIL.Image", "pillow")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        pil.fromarray(np.asarray(image, np.uint8)).save(folder / f"{prefix}_{i:03d}.png")
    return folder


def digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's handwritten digits: X [1797, 64] float32 in [0, 16], y [1797] int64."""
    sk = _import("sklearn.datasets", "scikit-learn")
    bunch = sk.load_digits()
    return bunch.data.astype(np.float32), bunch.target.astype(np.int64)
