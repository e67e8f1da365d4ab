"""crosschannel.transfer: fine-tuning on PASCAL VOC (classification, detection, segmentation).

Nothing here yet: the fine-tuning issue builds it on ``pretext``'s encoders (``pretext.models``)."""
