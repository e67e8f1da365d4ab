"""crosschannel.linear_probe: frozen-encoder evaluations of colorization features.

* ``linear_probe.train``: per-layer linear classifiers on a frozen encoder, all taps in one pass
  (Zhang et al. ECCV16, Sec. 3.2 / Fig. 7 pooling; the solver of the released feature_learning_tests/linear).
* ``linear_probe.compare``: overlay per-layer accuracy of several probe runs (as in Fig. 7).
* ``linear_probe.svm``: VOC07 linear SVM benchmark (Goyal et al. ICCV19, fair_self_supervision_benchmark).

Imports ``pretext``; ``pretext`` never imports this package.
"""
