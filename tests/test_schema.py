"""The engine record schema (chatrex_jax/data/schema.py): codec, validation, keys."""
import copy
import io

import numpy as np
from PIL import Image
import pytest

from chatrex_jax.data import schema


def _png(w=32, h=24) -> bytes:
  buf = io.BytesIO()
  Image.new("RGB", (w, h), (10, 200, 30)).save(buf, format="PNG")
  return buf.getvalue()


def make_record(**over):
  rec = {
      "schema_version": schema.SCHEMA_VERSION, "key": schema.make_key("src", "a.png"),
      "source": "src", "item_id": "a.png", "image": _png(), "image_format": "PNG",
      "width": 32, "height": 24, "caption": "A red circle and a blue square.",
      "caption_provenance": {"backend": "vlm", "version": "1"},
      "regions": [
          {"id": 0, "box": [1.0, 2.0, 10.5, 12.0], "category": "circle", "phrase": "circle",
           "description": "a red circle", "referring": "the red circle", "score": 0.9,
           "verify_score": 0.8, "granularity": "coarse", "provenance": {"box": "g@1"}},
          {"id": 1, "box": [12.0, 2.0, 32.0, 24.0], "category": "square", "phrase": "square",
           "description": "a blue square", "referring": "the square", "score": 0.5,
           "verify_score": 1.0, "granularity": "fine", "provenance": {}},
      ],
      "proposals": {"boxes": [[0, 0, 5, 5]], "scores": [0.3], "provenance": "upn"},
      "conversations": [
          {"role": "user", "text": "What is there?", "groundings": []},
          {"role": "assistant", "text": "A red circle.", "groundings": [
              {"start": 2, "end": 12, "region_ids": [0]}]},
      ],
      "extra": {"anything": [1, 2]},
  }
  rec.update(over)
  return rec


def test_roundtrip_is_exact_and_deterministic():
  rec = make_record()
  buf = schema.encode(rec)
  assert schema.encode(copy.deepcopy(rec)) == buf  # byte-stable (sorted JSON keys)
  back = schema.decode(buf, check=True)
  assert back == rec
  assert Image.open(io.BytesIO(back["image"])).size == (32, 24)


def _example_message_class():
  """tf.train.Example built from its .proto definition with the protobuf runtime, to check
  our hand-written codec against the real wire format (no TensorFlow needed)."""
  from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
  f = descriptor_pb2.FileDescriptorProto(name="feature_test.proto", package="tensorflow",
                                         syntax="proto3")
  T = descriptor_pb2.FieldDescriptorProto
  def msg(name, fields, options=None):
    m = f.message_type.add(name=name)
    for num, (fname, ftype, label, tname) in enumerate(fields, 1):
      fd = m.field.add(name=fname, number=num, type=ftype, label=label)
      if tname:
        fd.type_name = tname
    if options:
      m.options.CopyFrom(options)
    return m
  rep, opt = T.LABEL_REPEATED, T.LABEL_OPTIONAL
  msg("BytesList", [("value", T.TYPE_BYTES, rep, None)])
  msg("FloatList", [("value", T.TYPE_FLOAT, rep, None)])
  msg("Int64List", [("value", T.TYPE_INT64, rep, None)])
  feat = msg("Feature", [("bytes_list", T.TYPE_MESSAGE, opt, ".tensorflow.BytesList"),
                         ("float_list", T.TYPE_MESSAGE, opt, ".tensorflow.FloatList"),
                         ("int64_list", T.TYPE_MESSAGE, opt, ".tensorflow.Int64List")])
  feat.oneof_decl.add(name="kind")
  for fd in feat.field:
    fd.oneof_index = 0
  feats = msg("Features", [("feature", T.TYPE_MESSAGE, rep, ".tensorflow.Features.FeatureEntry")])
  entry = feats.nested_type.add(name="FeatureEntry")
  entry.field.add(name="key", number=1, type=T.TYPE_STRING, label=opt)
  entry.field.add(name="value", number=2, type=T.TYPE_MESSAGE, label=opt,
                  type_name=".tensorflow.Feature")
  entry.options.map_entry = True
  msg("Example", [("features", T.TYPE_MESSAGE, opt, ".tensorflow.Features")])
  pool = descriptor_pool.DescriptorPool()
  pool.Add(f)
  return message_factory.GetMessageClass(pool.FindMessageTypeByName("tensorflow.Example"))


def test_wire_format_is_tf_train_example():
  Example = _example_message_class()
  buf = schema.encode(make_record())
  ex = Example.FromString(buf)
  assert set(ex.features.feature) == set(schema.FEATURE_KEYS)
  assert ex.features.feature["key"].bytes_list.value[0].decode() == make_record()["key"]
  assert ex.features.feature["image"].bytes_list.value[0] == make_record()["image"]
  # and the other direction, including int64 (negative) and float lists
  ref = Example()
  ref.features.feature["b"].bytes_list.value.extend([b"x", b""])
  ref.features.feature["i"].int64_list.value.extend([3, -7, 2**40])
  ref.features.feature["f"].float_list.value.extend([0.5, -2.0])
  got = schema.decode_example(ref.SerializeToString())
  assert got == {"b": [b"x", b""], "i": [3, -7, 2**40], "f": [0.5, -2.0]}
  mine = schema.encode_example({"b": [b"x", b""], "i": [3, -7, 2**40], "f": [0.5, -2.0]})
  assert Example.FromString(mine) == ref


def test_validate_reports_every_problem_with_record_and_field():
  rec = make_record()
  rec["regions"][0]["box"] = [5.0, 2.0, 4.0, 12.0]          # x2 < x1
  rec["regions"][1]["granularity"] = "medium"
  rec["regions"][1]["score"] = 1.5
  rec["conversations"][1]["groundings"][0]["region_ids"] = [7]
  rec["width"] = 0
  with pytest.raises(schema.SchemaError) as e:
    schema.validate(rec)
  msg = str(e.value)
  assert msg.startswith(f"record {rec['key']}:")
  for part in ("regions[0].box", "regions[1].granularity", "regions[1].score",
               "conversations[1].groundings[0].region_ids", "width"):
    assert part in msg, (part, msg)


@pytest.mark.parametrize("field,value", [
    ("key", "Not A Key"), ("image", b""), ("caption", None), ("regions", "x"),
    ("schema_version", 0), ("caption_provenance", {"backend": "x"}),
])
def test_validate_rejects_bad_fields(field, value):
  with pytest.raises(schema.SchemaError, match=field):
    schema.validate(make_record(**{field: value}))


def test_box_outside_image_and_bad_span_rejected():
  rec = make_record()
  rec["regions"][1]["box"] = [12.0, 2.0, 33.0, 24.0]
  rec["conversations"][1]["groundings"][0]["end"] = 99
  with pytest.raises(schema.SchemaError, match=r"regions\[1\].box.*groundings\[0\]"):
    schema.validate(rec)


def test_decode_refuses_newer_schema_and_key_mismatch():
  rec = make_record()
  newer = dict(rec, schema_version=schema.SCHEMA_VERSION + 1)
  with pytest.raises(schema.SchemaError, match="not readable"):
    schema.decode(schema.encode(newer, check=False))
  feats = schema.decode_example(schema.encode(rec))
  feats["key"] = [b"other"]
  with pytest.raises(schema.SchemaError, match="differ"):
    schema.decode(schema.encode_example(feats))


def test_keys_and_shards_are_stable():
  assert schema.make_key("src", "a.png") == schema.make_key("src", "a.png")
  assert schema.make_key("src", "a.png") != schema.make_key("src2", "a.png")
  assert schema.make_key("a", "b") == "4a3dec2d1f8245280855"  # pinned: keys never change
  keys = [schema.make_key("s", str(i)) for i in range(4000)]
  counts = np.bincount([schema.shard_of(k, 8) for k in keys], minlength=8)
  assert counts.min() > 400 and counts.max() < 600
  assert schema.shard_filename("rv", "train", 3, 16) == "rv-train.array_record-00003-of-00016"


def test_region_arrays():
  boxes, scores, fine = schema.region_arrays(make_record())
  assert boxes.shape == (2, 4) and boxes.dtype == np.float32
  np.testing.assert_array_equal(fine, [False, True])
  np.testing.assert_allclose(scores, [0.9, 0.5])
