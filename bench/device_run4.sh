export LD_LIBRARY_PATH=$PWD/build-device FLASHLIN_LIBRARY=$PWD/build-device/libflashlin.so PYTHONPATH=$PWD/python PYTHONUNBUFFERED=1
mkdir -p $OUT
s=$(date +%s)
timeout 200 python3 -m pytest -q -p no:cacheprovider tests/python/test_stress.py -k cuda --tb=line --durations=5 > $OUT/stress.txt 2>&1; echo "stress rc=$? $(( $(date +%s) - s )) s"
grep -E "AssertionError: " $OUT/stress.txt | cut -c1-600 | sort -u | head -20; tail -9 $OUT/stress.txt
s=$(date +%s)
( timeout 100 python3 -m pytest -q -p no:cacheprovider tests/python/test_cuda_paths.py -k general --tb=line; timeout 50 python3 -m pytest -q -p no:cacheprovider tests/python/test_concurrency.py tests/python/test_determinism.py -k "cuda or streams or tensor_core" --tb=line ) > $OUT/paths.txt 2>&1; echo "paths rc=$? $(( $(date +%s) - s )) s"
grep -E "AssertionError: " $OUT/paths.txt | cut -c1-400 | sort -u | head; tail -2 $OUT/paths.txt
FLASHLIN_SANITIZE_TOOLS=racecheck FLASHLIN_SANITIZE_TIMEOUT=120 bash scripts/compute_sanitize.sh > $OUT/compute_sanitizer.txt 2>&1; tail -2 $OUT/compute_sanitizer.txt
timeout 80 python3 bench/gpu_bench.py --no-fla --sections memory --csv $OUT/mem.csv --png $OUT/mem.png > $OUT/mem.txt 2>&1; echo "mem rc=$?"; tail -12 $OUT/mem.txt
