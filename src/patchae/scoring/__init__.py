"""Scorers: plain torch modules that turn what a network computes into anomaly maps and image scores.

:class:`BankScorer` (Patch AE, PatchCore) scores patch embeddings against a memory bank; :class:`StatisticsScorer`
(SSL-AE, DAAD) standardises per-pixel error terms with statistics of normal images. Both ``fit`` on normal
images' outputs and return ``(maps, image_scores)`` from ``forward``; :mod:`patchae.scoring.maps` holds the
upsampling, blur and image scores they share. Training, testing, predict and export all run these.
"""

from patchae.scoring.bank import BankScorer
from patchae.scoring.statistics import StatisticsScorer

__all__ = ["BankScorer", "StatisticsScorer"]
