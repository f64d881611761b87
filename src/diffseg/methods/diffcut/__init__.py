"""DiffCut: a recursive normalised cut of one layer's tokens (`ncut`), clusters assigned to pixels (`segment`), optional
PAMR refinement (`pamr`)."""
