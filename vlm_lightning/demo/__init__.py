"""The bundled CPU demo (``make demo``): its synthetic OCR data, its before/after report, and reading the
exported GGUF back through llama.cpp. Nothing in the library depends on it.

    data.py       make_demo_ocr_dataset, PROMPT, DemoOCRData (the CLI's --demo_data), write_demo_data
    report.py     DemoReport: validation CER before and after training
    ask_gguf.py   python -m vlm_lightning.demo.ask_gguf: llama.cpp answers the validation questions
    llama_cpp.py  reading a GGUF with llama.cpp (logits, libmtmd image + text), shared with the tests

Example:
    >>> from vlm_lightning.demo.data import make_demo_ocr_dataset
    >>> paths = make_demo_ocr_dataset("/tmp/demo_ocr", n_train=32, n_val=8)
"""
