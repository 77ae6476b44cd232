"""Where a backbone comes from and which of its nodes are taps.

:mod:`.source` is the interface every model source implements (torchvision's registry in
:mod:`.torchvision_source`, timm's in :mod:`.timm_source`): the name check, the weights, the
preprocessing preset and the traced graph. :mod:`.taps` resolves friendly tap names over any
source, with the family schemes of :mod:`.schemes`. :class:`features.backbones.Backbone` puts one
source and its resolver behind the interface the rest of the code uses.
"""
