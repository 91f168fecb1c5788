"""The registered model names, known without importing torch (validation checks `--model` against them).
The builders register in MODELS under these names; a test holds the two equal."""

MODEL_NAMES = ("preact_resnet18", "resnet18", "small_cnn", "vgg16_bn", "wrn16_1", "wrn40_2")
