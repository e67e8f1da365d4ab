"""crosschannel.linear_probe: frozen-encoder evaluations of colorization features.

* ``linear_probe.train``: per-layer linear classifiers on a frozen encoder, all taps in one pass
  (Zhang et al. ECCV16, Sec. 3.2 / Table 4; protocol of Goyal et al. ICCV19).
* ``linear_probe.compare``: overlay per-layer accuracy of several probe runs (as in Fig. 7).
* ``linear_probe.svm``: VOC07 linear SVM benchmark (Goyal et al. ICCV19 / VISSL).

Imports ``pretext``; ``pretext`` never imports this package.
"""
