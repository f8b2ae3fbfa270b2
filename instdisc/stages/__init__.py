"""One module per DVC stage, in dvc.yaml order: prepare, pretrain, evaluate, export, index, linear,
places, semi_supervised, detection. Each is `params.yaml section -> tracking run -> library call ->
metrics/plots`, runs as `python -m instdisc.stages.<name>` (the stage's dvc.yaml `cmd`) or as
`instdisc <name>`, and shares the chores in `instdisc.stages._common`.
"""

STAGES = ("prepare", "pretrain", "evaluate", "export", "index", "linear", "places",
          "semi_supervised", "detection")
