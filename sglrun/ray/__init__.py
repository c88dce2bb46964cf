"""Scale-out on Ray (``pip install 'sglrun[ray]'``): ``sglrun batch --ray`` and
``run_dataset`` for pipelines of one's own. Nothing outside this package imports Ray, and
this package imports it only when it runs.
"""

from __future__ import annotations

from sglrun.ray.dataset import run_dataset

__all__ = ["run_dataset"]
