"""DiffSeg: aggregate self-attention over every grid (`aggregation`), merge by KL from an anchor grid (`merging`),
turn proposals into a label map (`labelling`); `segment.segment_attention` runs the three."""
