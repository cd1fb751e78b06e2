"""The MedMNIST v2 benchmark table (Yang et al., Scientific Data 2023, Tables 3-4): test AUC / ACC per method.

Figures as published, for the comparison rows of ``benchmarks/medmnist.py`` and
``python -m tasks.reporting.report``. Protocol of the baselines: 100 epochs, Adam 1e-3, the checkpoint with the best
validation AUC tested; ACC at argmax.
"""

from __future__ import annotations

# dataset flag -> [(method, auc, acc)]
_3D_METHODS = ("ResNet-18+2.5D", "ResNet-18+3D", "ResNet-18+ACS", "ResNet-50+2.5D", "ResNet-50+3D", "ResNet-50+ACS",
               "auto-sklearn", "AutoKeras")
_3D = {
    "organmnist3d": ((.977, .788), (.996, .907), (.994, .900), (.974, .769), (.994, .883), (.994, .889), (.977, .814),
                     (.979, .804)),
    "nodulemnist3d": ((.838, .835), (.863, .844), (.873, .847), (.835, .848), (.875, .847), (.886, .841),
                      (.914, .874), (.844, .834)),
    "fracturemnist3d": ((.587, .451), (.712, .508), (.714, .497), (.552, .397), (.725, .494), (.750, .517),
                        (.628, .453), (.642, .458)),
    "adrenalmnist3d": ((.718, .772), (.827, .721), (.839, .754), (.732, .763), (.828, .745), (.828, .758),
                       (.828, .802), (.804, .705)),
    "vesselmnist3d": ((.748, .846), (.874, .877), (.930, .928), (.751, .877), (.907, .918), (.912, .858),
                      (.910, .915), (.773, .894)),
    "synapsemnist3d": ((.634, .696), (.820, .745), (.705, .722), (.669, .735), (.851, .795), (.719, .709),
                       (.631, .730), (.538, .724)),
}
_2D_METHODS = ("ResNet-18 (28)", "ResNet-18 (224)", "ResNet-50 (28)", "ResNet-50 (224)", "auto-sklearn", "AutoKeras",
               "Google AutoML Vision")
_2D = {
    "pneumoniamnist": ((.944, .854), (.956, .864), (.948, .854), (.962, .884), (.942, .855), (.947, .878),
                       (.991, .946)),
    "breastmnist": ((.901, .863), (.891, .833), (.857, .812), (.866, .842), (.836, .803), (.871, .831), (.919, .861)),
    "dermamnist": ((.917, .735), (.920, .754), (.913, .735), (.912, .731), (.902, .719), (.915, .749), (.914, .768)),
    "bloodmnist": ((.998, .958), (.998, .963), (.997, .956), (.997, .950), (.984, .878), (.998, .961), (.998, .966)),
    "organamnist": ((.997, .935), (.998, .951), (.997, .935), (.998, .947), (.963, .762), (.994, .905), (.990, .886)),
    "pathmnist": ((.983, .907), (.989, .909), (.990, .911), (.989, .892), (.934, .716), (.959, .834), (.944, .728)),
}


def paper_rows(dataset: str) -> list[tuple[str, float, float]]:
    """The published (method, test AUC, test ACC) rows for a MedMNIST flag; empty if the table lacks the set."""
    flag = dataset.lower()
    if flag in _3D:
        return [(m, auc, acc) for m, (auc, acc) in zip(_3D_METHODS, _3D[flag], strict=True)]
    if flag in _2D:
        return [(m, auc, acc) for m, (auc, acc) in zip(_2D_METHODS, _2D[flag], strict=True)]
    return []
