# ctest "install_consumer": install the built flashlin into a fresh prefix inside the build tree,
# then configure, build and run examples/consumer against it through find_package(flashlin).
#
#   cmake -DFLASHLIN_BUILD_DIR=<build> -DCONSUMER_SOURCE_DIR=<repo>/examples/consumer
#         -DWORK_DIR=<scratch dir> [-DFLASHLIN_CONFIG=Release] [-DGENERATOR=Ninja]
#         [-DCXX_COMPILER=g++] [-DEXTRA_FLAGS="-fsanitize=..."] -P InstallConsumerTest.cmake
cmake_minimum_required(VERSION 3.25)

foreach(var FLASHLIN_BUILD_DIR CONSUMER_SOURCE_DIR WORK_DIR)
  if(NOT ${var})
    message(FATAL_ERROR "InstallConsumerTest.cmake: -D${var}=... is required")
  endif()
endforeach()
if(NOT FLASHLIN_CONFIG)
  set(FLASHLIN_CONFIG Release)
endif()

set(prefix "${WORK_DIR}/prefix")
set(build "${WORK_DIR}/build")
file(REMOVE_RECURSE "${WORK_DIR}")
file(MAKE_DIRECTORY "${WORK_DIR}")

function(run_step name)
  message(STATUS "[install_consumer] ${name}: ${ARGN}")
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE rc)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "[install_consumer] ${name} failed (${rc})")
  endif()
endfunction()

run_step(install "${CMAKE_COMMAND}" --install "${FLASHLIN_BUILD_DIR}"
         --config "${FLASHLIN_CONFIG}" --prefix "${prefix}")

set(configure_args
  -S "${CONSUMER_SOURCE_DIR}" -B "${build}"
  "-DCMAKE_BUILD_TYPE=${FLASHLIN_CONFIG}"
  "-DCMAKE_PREFIX_PATH=${prefix}"
  -DCMAKE_FIND_USE_PACKAGE_REGISTRY=OFF)
if(GENERATOR)
  list(APPEND configure_args -G "${GENERATOR}")
endif()
if(CXX_COMPILER)
  list(APPEND configure_args "-DCMAKE_CXX_COMPILER=${CXX_COMPILER}")
endif()
if(EXTRA_FLAGS)
  list(APPEND configure_args "-DCMAKE_CXX_FLAGS=${EXTRA_FLAGS}" "-DCMAKE_C_FLAGS=${EXTRA_FLAGS}"
       "-DCMAKE_EXE_LINKER_FLAGS=${EXTRA_FLAGS}")
endif()
run_step(configure "${CMAKE_COMMAND}" ${configure_args})

# The package must come from the fresh prefix, not from anywhere else on the machine.
file(STRINGS "${build}/CMakeCache.txt" found_dir REGEX "^flashlin_DIR:")
string(REGEX REPLACE "^flashlin_DIR:[A-Z]+=" "" found_dir "${found_dir}")
file(REAL_PATH "${prefix}" real_prefix)
file(REAL_PATH "${found_dir}" real_found_dir)
string(FIND "${real_found_dir}" "${real_prefix}/" pos)
if(NOT pos EQUAL 0)
  message(FATAL_ERROR "[install_consumer] flashlin was found in ${found_dir}, not under ${prefix}")
endif()

run_step(build "${CMAKE_COMMAND}" --build "${build}" --config "${FLASHLIN_CONFIG}")

foreach(exe flashlin_consumer flashlin_consumer_c)
  if(EXISTS "${build}/${FLASHLIN_CONFIG}/${exe}")  # multi-config generators
    run_step(${exe} "${build}/${FLASHLIN_CONFIG}/${exe}")
  else()
    run_step(${exe} "${build}/${exe}")
  endif()
endforeach()
message(STATUS "[install_consumer] OK")
