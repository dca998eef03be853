"""Progress bars for long work: tqdm on a terminal, quiet and cheap elsewhere."""

from typing import Iterable, Optional, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


def progress_bar(iterable: Iterable[T], desc: str = "", total: Optional[int] = None, **kwargs) -> Iterable[T]:
    """Wrap ``iterable`` in a tqdm bar on stderr (``disable=None`` hides it off a TTY)."""
    return tqdm(iterable, desc=desc, total=total, dynamic_ncols=True, disable=None, leave=False, **kwargs)
