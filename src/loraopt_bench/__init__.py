"""loraopt_bench: the fine-tuning harness and the benchmarks of loraopt (``pip install "loraopt[bench]"``).

Behind the ``loraopt`` command (``finetune``, ``evaluate``, ``demo``, ``bench linear|online|quality|digits``) and the
GPU cost scripts (``python -m loraopt_bench.cost``, ``python -m loraopt_bench.loko_jacobian``,
``python -m loraopt_bench.loko_jacobian_cost``). The optimizer library ``loraopt`` does not import this package.

* :mod:`loraopt_bench.common`: ``drive``/``feed`` (the one place that knows backward vs ``observe``), ``jsonable``,
  ``mean_std``, the CPU thread count;
* :mod:`loraopt_bench.assets`, :mod:`loraopt_bench.data`: pretrained models and datasets;
* :mod:`loraopt_bench.finetune`: the fine-tuning loop of ``loraopt finetune``/``evaluate``/``demo``;
* :mod:`loraopt_bench.linear`, :mod:`loraopt_bench.online`, :mod:`loraopt_bench.quality`,
  :mod:`loraopt_bench.digits`: the benchmarks;
* :mod:`loraopt_bench.report`: tables, plots and atomic writes.
"""
