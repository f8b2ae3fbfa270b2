import numpy as np
import pytest

from instdisc.data.synthetic import class_names, make_synthetic


def test_shapes_dtypes_and_labels():
    splits, names = make_synthetic(4, 5, 3, 16, seed=0)
    assert names == ["00-solid-disc", "01-stripes-square", "02-checker-triangle", "03-dots-ring"]
    images, labels = splits["train"]
    assert images.shape == (20, 16, 16, 3) and images.dtype == np.uint8
    assert labels.dtype == np.int64 and labels.tolist() == [k for k in range(4) for _ in range(5)]
    assert splits["test"][0].shape == (12, 16, 16, 3)


def test_same_seed_same_images_other_seed_other_images():
    a, _ = make_synthetic(3, 4, 2, 16, seed=7)
    b, _ = make_synthetic(3, 4, 2, 16, seed=7)
    c, _ = make_synthetic(3, 4, 2, 16, seed=8)
    for split in ("train", "test"):
        np.testing.assert_array_equal(a[split][0], b[split][0])
    assert not np.array_equal(a["train"][0], c["train"][0])
    assert not np.array_equal(a["train"][0][:8], a["test"][0][:8])


def test_a_class_does_not_depend_on_the_other_classes():
    few, _ = make_synthetic(2, 3, 1, 16, seed=1)
    many, _ = make_synthetic(5, 3, 1, 16, seed=1)
    np.testing.assert_array_equal(few["train"][0], many["train"][0][:6])


def test_hundred_distinct_classes_and_limits():
    assert len(set(class_names(100))) == 100
    assert len({name.split("-", 1)[1] for name in class_names(100)}) == 100
    with pytest.raises(ValueError, match="num_classes = 101"):
        class_names(101)
    with pytest.raises(ValueError, match="image_size = 4"):
        make_synthetic(2, 1, 1, 4, seed=0)


def test_class_is_not_decodable_from_mean_colour_but_images_vary():
    """Colour is a nuisance: nearest class-mean colour is near chance (10%)."""
    splits, _ = make_synthetic(10, 60, 30, 32, seed=0)
    (x_train, y_train), (x_test, y_test) = splits["train"], splits["test"]
    colour = lambda x: x.reshape(len(x), -1, 3).mean(1)  # noqa: E731
    centres = np.stack([colour(x_train)[y_train == k].mean(0) for k in range(10)])  # (10, 3)
    guess = np.argmin(((colour(x_test)[:, None] - centres[None]) ** 2).sum(-1), axis=1)
    assert (guess == y_test).mean() < 0.3
    assert x_train.min() < 20 and x_train.max() > 235
    assert x_train.reshape(600, -1).std(1).min() > 10  # every image has visible structure
