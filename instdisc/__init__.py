"""instdisc: non-parametric instance discrimination (Wu et al. 2018, arXiv:1805.01978) as a pipeline."""
