"""crosschannel.pretext: colour maths, ab encoding, colorization networks and the pretext trainer."""
__version__ = "0.1.0"
