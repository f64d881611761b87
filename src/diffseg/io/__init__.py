"""Files in and out: decoding images (`images`), the output writers and atomic writes (`outputs`: a new output format is
one `Writer` there), overlays (`visualisation`)."""
