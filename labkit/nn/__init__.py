"""Network building blocks shared by every detector: backbones, necks (FPN, ChannelMapper), Scale, init."""
