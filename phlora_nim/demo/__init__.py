"""The embedded end-to-end demo and the small models it (and the tests) fine-tune on CPU."""
