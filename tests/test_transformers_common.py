"""transformers' own common tests (the mixins every model in transformers passes) run against this package's classes.

The mixins come from the sdist of the installed transformers (see helpers/transformers_test_mixins.py). This file
holds the testers that build tiny configs and inputs for them, and the reviewed list of mixin tests that do not apply.
"""

import copy
import inspect
import re
import shutil
import tempfile
import unittest

import pytest
import torch
from helpers.tiny_model import TINY_VISION_CONFIG, tiny_text_config
from helpers.tiny_tokenizer import build_tiny_tokenizer
from helpers.transformers_test_mixins import load_or_skip
from transformers.models.auto import modeling_auto

from fastvlm_hf import (
    FastViTHDConfig,
    FastViTHDModel,
    FastVLMConfig,
    FastVLMForConditionalGeneration,
    FastVLMImageProcessor,
    FastVLMModel,
    FastVLMProcessor,
)

common = load_or_skip()
ids_tensor = common.modeling.ids_tensor
floats_tensor = common.modeling.floats_tensor

IMAGE_SIZE = TINY_VISION_CONFIG["image_size"]
PATCH_SIZE = FastViTHDConfig(**TINY_VISION_CONFIG).patch_size
TOKENS_PER_IMAGE = (IMAGE_SIZE // PATCH_SIZE) ** 2  # 4 for one 128-px image

# Reviewed list of the mixin tests that do not apply, with the reason. Everything else runs and must pass.
# (Parameterized variants, `test_name_0_...`, follow their test's entry.)
NOT_APPLICABLE = {
    "*": {
        "test_generation_tester_mixin_inheritance": "the sdist lacks transformers' GenerationTesterMixin (an empty "
        "stand-in takes its place); generation is tested by this repository's own tests",
    },
    "FastVLMModelTest": {
        "test_eager_matches_sdpa_inference": "feeds `input_ids` alone (image tokens, and random ids that pad the "
        "batch) without `pixel_values`: FastVLM refuses image tokens without their images on purpose",
        "test_model_rope_scaling_from_config": "feeds random ids over the whole vocabulary, the image token among "
        "them, without `pixel_values`: refused on purpose",
        "test_get_image_features_attentions": "FastViTHD returns no attention maps (has_attentions=False in its own "
        "test below), as the timm tower of transformers' own fast_vlm",
    },
    "FastViTHDModelTest": {},
    "FastVLMImageProcessingTest": {
        "test_new_models_require_torchvision_backend": "transformers' rule for image processors added to "
        "transformers; this package's processor is PIL/NumPy only by design (no torchvision)",
        "test_pil_can_load_without_torchvision": "(transformers before 5.23) imports the processor from "
        "`transformers.models.<the test's folder>`, where transformers' own processors live; this package imports "
        "with torchvision blocked in CI, and its processor never uses torchvision",
    },
    "FastVLMProcessorTest": {},
}
_four_channels_test = common.image_processing.ImageProcessingTestMixin.test_call_numpy_4_channels
if "do_convert_rgb=False" not in inspect.getsource(_four_channels_test):
    NOT_APPLICABLE["FastVLMImageProcessingTest"]["test_call_numpy_4_channels"] = (
        "before 5.23 this test expects `do_convert_rgb=True` to leave NumPy arrays as they are (transformers then "
        "converted only PIL images); this processor converts every input, as 5.23's mixin expects "
        "(test_convert_to_rgb_mixed_input_batch), and 5.23's variant of this test runs"
    )


def _skip_if_not_applicable(test_case: unittest.TestCase) -> None:
    reasons = {**NOT_APPLICABLE["*"], **NOT_APPLICABLE[type(test_case).__name__]}
    name = test_case._testMethodName
    for skipped, reason in reasons.items():
        if name == skipped or re.fullmatch(rf"{skipped}_\d+(_.*)?", name):
            test_case.skipTest(reason)


@pytest.fixture(scope="module", autouse=True)
def _named_like_transformers_models():
    """Some mixin tests choose what to check by class name, from transformers' `*_MAPPING_NAMES` tables (a base
    model has no loss, an image-text-to-text head gets `labels`, ...). Give our classes the entries that their Auto
    registrations imply, for the duration of this module."""
    added = []
    for mapping in vars(modeling_auto).values():
        if not isinstance(mapping, modeling_auto._LazyAutoMapping):
            continue
        for config_class, model_class in mapping._extra_content.items():
            names = mapping._model_mapping
            if model_class.__module__.startswith("fastvlm_hf.") and config_class.model_type not in names:
                names[config_class.model_type] = model_class.__name__
                added.append((names, config_class.model_type))
    yield
    for names, model_type in added:
        del names[model_type]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """The models here are tiny: one thread runs them faster than several that contend for a shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --------------------------------------------------------------------------------------------------------- models


class FastViTHDModelTester:
    """helpers/tiny_model.py's tiny FastViTHD (5 stages, stride 64) and a batch of 128-px images."""

    def __init__(self, parent, batch_size=2, is_training=True):
        self.parent = parent
        self.batch_size = batch_size
        self.is_training = is_training
        self.num_channels = 3
        self.image_size = IMAGE_SIZE
        self.patch_size = PATCH_SIZE
        self.hidden_size = TINY_VISION_CONFIG["hidden_size"]
        self.expected_num_hidden_layers = len(TINY_VISION_CONFIG["depths"]) + 1  # the stem, then each stage

    def get_config(self):
        return FastViTHDConfig(**TINY_VISION_CONFIG)

    def prepare_config_and_inputs_for_common(self):
        pixel_values = floats_tensor([self.batch_size, self.num_channels, self.image_size, self.image_size])
        return self.get_config(), {"pixel_values": pixel_values}


class FastVLMModelTester:
    """A tiny FastVLM (the tiny FastViTHD + a 2-layer Qwen2); each sequence holds one image's tokens, after one text
    token as in a chat prompt, and `pixel_values` holds that image."""

    def __init__(self, parent, batch_size=2, text_length=7, is_training=True):
        self.parent = parent
        self.batch_size = batch_size
        self.is_training = is_training
        self.pad_token_id = 0
        self.image_token_id = 1
        self.vocab_size = 99
        self.text_config = {**tiny_text_config(self.vocab_size), "pad_token_id": self.pad_token_id}
        self.vision_config = dict(TINY_VISION_CONFIG)
        self.vision_model_tester = FastViTHDModelTester(parent, batch_size=batch_size)
        self.num_channels = 3
        self.image_size = IMAGE_SIZE
        self.seq_length = text_length + TOKENS_PER_IMAGE
        self.hidden_size = self.text_config["hidden_size"]
        self.num_hidden_layers = self.text_config["num_hidden_layers"]
        self.num_attention_heads = self.text_config["num_attention_heads"]

    def get_config(self):
        return FastVLMConfig(
            vision_config=self.vision_config,
            text_config=self.text_config,
            image_token_id=self.image_token_id,
            pad_token_id=self.pad_token_id,
        )

    def prepare_config_and_inputs_for_common(self):
        # text ids above the pad and image tokens, so that only the placed image tokens are image tokens
        input_ids = ids_tensor([self.batch_size, self.seq_length], self.vocab_size - 2) + 2
        input_ids[:, 1 : 1 + TOKENS_PER_IMAGE] = self.image_token_id
        inputs = {
            "input_ids": input_ids,
            "attention_mask": torch.ones_like(input_ids),
            "pixel_values": floats_tensor([self.batch_size, self.num_channels, self.image_size, self.image_size]),
        }
        return self.get_config(), inputs


class FastVLMModelTest(common.modeling.ModelTesterMixin, unittest.TestCase):
    all_model_classes = (FastVLMModel, FastVLMForConditionalGeneration)
    _is_composite = True
    # The mixin dates a model by the copyright line of its sources, which ours lack; it is new: check its init.
    test_can_init_all_missing_weights_before_2023 = True
    # `last_hidden_state` of get_image_features is the vision tower's (B, C, H', W') feature map, as in transformers'
    # own fast_vlm; the mixin's shape check expects channels last (the projected tokens are `pooler_output`).
    skip_test_image_features_output_shape = True
    # 4.57's head pruning and head masking (gone in 5.0): Qwen2 has neither, as in transformers' own VLM tests.
    test_pruning = test_head_masking = False

    def setUp(self):
        _skip_if_not_applicable(self)
        self.model_tester = FastVLMModelTester(self)


class FastViTHDModelTest(common.modeling.ModelTesterMixin, unittest.TestCase):
    all_model_classes = (FastViTHDModel,)
    has_attentions = False
    test_resize_embeddings = False
    test_can_init_all_missing_weights_before_2023 = True
    test_pruning = test_head_masking = False

    def setUp(self):
        _skip_if_not_applicable(self)
        self.model_tester = FastViTHDModelTester(self)

    # Overridden as in transformers' convolutional models (ConvNext, ResNet): the hidden states are feature maps, the
    # stem's output then each stage's, and not (batch, sequence, hidden) tensors.
    def test_hidden_states_output(self):
        config, inputs = self.model_tester.prepare_config_and_inputs_for_common()
        side = self.model_tester.image_size // config.stem_stride**2
        expected = [(config.embed_dims[0], side, side)]
        for width, downsamples in zip(config.embed_dims, config.downsamples):
            side //= config.downsample_stride if downsamples else 1
            expected.append((width, side, side))

        def check(model_config, **kwargs):
            model = FastViTHDModel(copy.deepcopy(model_config)).eval()
            with torch.no_grad():
                hidden_states = model(**inputs, **kwargs).hidden_states
            self.assertIsNotNone(hidden_states)
            self.assertEqual([tuple(h.shape[1:]) for h in hidden_states], expected)
            self.assertTrue(all(len(h) == self.model_tester.batch_size for h in hidden_states))

        check(config, output_hidden_states=True)
        config.output_hidden_states = True
        check(config)

    # Overridden as in transformers' ViT-like encoders: the input "embedding" of an image encoder is a module that
    # embeds pixels (here the stem), not an `nn.Embedding`; there is no output embedding.
    def test_model_get_set_embeddings(self):
        config, _ = self.model_tester.prepare_config_and_inputs_for_common()
        model = FastViTHDModel(config)
        self.assertIsInstance(model.get_input_embeddings(), torch.nn.Module)
        self.assertIsNone(model.get_output_embeddings())


# -------------------------------------------------------------------------------------------------------- configs


class _ConfigTests:
    """One test per check of the installed version's ConfigTester."""

    def run_check(self, name):
        if name == "check_config_arguments_init" and not common.has_config_common_kwargs:
            self.skipTest("needs transformers' `config_common_kwargs` (tests/utils), which the sdist does not ship")
        getattr(self.config_tester, name)()


class FastVLMConfigTest(_ConfigTests, unittest.TestCase):
    def setUp(self):
        self.model_tester = FastVLMModelTester(self)  # the custom-kwargs check builds its config
        self.config_tester = common.configuration.ConfigTester(
            self, config_class=FastVLMConfig, has_text_modality=False, image_token_id=5, projector_bias=False
        )


class FastViTHDConfigTest(_ConfigTests, unittest.TestCase):
    def setUp(self):
        self.model_tester = FastViTHDModelTester(self)
        self.config_tester = common.configuration.ConfigTester(
            self,
            config_class=FastViTHDConfig,
            has_text_modality=False,
            # 4.57 and 5.0 also build the config with each of these set to its index in the list: hidden_size first,
            # as it must be a multiple of the last stage width (0 is).
            common_properties=["hidden_size", "num_channels", "image_size"],
            **TINY_VISION_CONFIG,
        )


for _check in sorted(vars(common.configuration.ConfigTester)):
    if _check.startswith(("create_and_test_", "check_")):
        for _test_case in (FastVLMConfigTest, FastViTHDConfigTest):
            setattr(_test_case, f"test_{_check}", lambda self, name=_check: self.run_check(name))
del _check, _test_case


# ------------------------------------------------------------------------------------------------ image processor


class FastVLMImageProcessingTester(getattr(common.image_processing, "ImageProcessingTester", object)):
    """The processor's settings for the mixin and the output it should give. The base class exists from 5.23 on,
    whose mixin reads the classes to test from `image_processing_classes` (backend -> class)."""

    def __init__(self, parent, batch_size=7, num_channels=3, min_resolution=30, max_resolution=400):
        self.parent = parent
        self.batch_size = batch_size
        self.num_channels = num_channels
        self.min_resolution = min_resolution
        self.max_resolution = max_resolution
        self.size = {"height": IMAGE_SIZE, "width": IMAGE_SIZE}
        self.image_mode = "pad"
        self.patch_size = PATCH_SIZE
        self.do_normalize = True
        self.image_mean = [0.5, 0.5, 0.5]
        self.image_std = [0.5, 0.5, 0.5]
        self.do_convert_rgb = True
        self.image_processing_classes = {"pil": FastVLMImageProcessor}

    def prepare_image_processor_dict(self):
        keys = ("size", "image_mode", "patch_size", "do_normalize", "image_mean", "image_std", "do_convert_rgb")
        return {key: copy.deepcopy(getattr(self, key)) for key in keys}

    def expected_output_image_shape(self, images):
        return self.num_channels, self.size["height"], self.size["width"]

    def prepare_image_inputs(self, equal_resolution=False, numpify=False, torchify=False, **kwargs):
        settings = {
            "batch_size": self.batch_size,
            "num_channels": self.num_channels,
            "min_resolution": self.min_resolution,
            "max_resolution": self.max_resolution,
            **kwargs,
        }
        return common.image_processing.prepare_image_inputs(
            **settings, equal_resolution=equal_resolution, numpify=numpify, torchify=torchify
        )

    def prepare_processor_inputs(self, **kwargs):
        return {"images": self.prepare_image_inputs(**kwargs)}


class FastVLMImageProcessingTest(common.image_processing.ImageProcessingTestMixin, unittest.TestCase):
    image_processor_tester_class = FastVLMImageProcessingTester  # read by the mixin from 5.23 on
    image_processing_class = FastVLMImageProcessor  # read by the mixin before 5.23

    def setUp(self):
        _skip_if_not_applicable(self)
        super().setUp()
        self.image_processor_tester = FastVLMImageProcessingTester(self)

    if not hasattr(common.image_processing, "ImageProcessingTester"):  # before 5.23 the test class provides it

        @property
        def image_processor_dict(self):
            return self.image_processor_tester.prepare_image_processor_dict()


# ------------------------------------------------------------------------------------------------------ processor


class FastVLMProcessorTest(common.processing.ProcessorTesterMixin, unittest.TestCase):
    processor_class = FastVLMProcessor

    @classmethod
    def _setup_tokenizer(cls):
        return build_tiny_tokenizer()

    @classmethod
    def _setup_image_processor(cls):
        return FastVLMImageProcessor(size=IMAGE_SIZE)

    @classmethod
    def _setup_test_attributes(cls, processor):
        cls.image_token = processor.image_token

    @classmethod
    def setUpClass(cls):
        if hasattr(common.processing.ProcessorTesterMixin, "_setup_from_components"):  # 5.x builds it from the above
            super().setUpClass()
            return
        cls.tmpdirname = tempfile.mkdtemp()  # 4.57: the test class saves the processor that the mixin loads
        processor = cls.processor_class(image_processor=cls._setup_image_processor(), tokenizer=cls._setup_tokenizer())
        processor.save_pretrained(cls.tmpdirname)
        cls._setup_test_attributes(processor)

    @classmethod
    def tearDownClass(cls):
        if hasattr(common.processing.ProcessorTesterMixin, "tearDownClass"):
            super().tearDownClass()
        else:
            shutil.rmtree(cls.tmpdirname, ignore_errors=True)

    def setUp(self):
        _skip_if_not_applicable(self)
        super().setUp()
