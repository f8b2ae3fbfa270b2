"""Transfer protocols of Wu et al. 2018 (arXiv:1805.01978, Sec. 4.2-4.4)."""
