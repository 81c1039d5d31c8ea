"""Progress bars for long operations (download, convert, load, benchmark), on stderr."""

import sys

from tqdm import tqdm


def progress(iterable=None, total=None, desc="", unit="it", unit_scale=False, enabled=True):
    """A tqdm bar on stderr; hidden when stderr is not a terminal (tqdm's disable=None) or not enabled."""
    return tqdm(iterable, total=total, desc=desc, unit=unit, unit_scale=unit_scale,
                disable=None if enabled else True, file=sys.stderr, leave=False, dynamic_ncols=True)
