# tests/consumer/run_consumer_test.cmake - the CTest entry install_consumer:
#   1. cmake --install <build> --prefix <work>/prefix
#   2. configure + build tests/consumer against that prefix (find_package)
#   3. run the shared- and static-linked consumers
#   4. pkg-config: compile consumer.c with `pkg-config --cflags --libs kdloss`
#      from the installed kdloss.pc and run it (skipped without pkg-config)
#   5. the installed command answers --version
# Variables (-D): KDL_BUILD_DIR, KDL_CONSUMER_SRC, KDL_WORK_DIR, KDL_GENERATOR,
# KDL_C_COMPILER, KDL_PKG_CONFIG (may be empty), KDL_WITH_CUDA.
cmake_minimum_required(VERSION 3.24)

foreach(v KDL_BUILD_DIR KDL_CONSUMER_SRC KDL_WORK_DIR KDL_GENERATOR KDL_C_COMPILER)
  if(NOT DEFINED ${v})
    message(FATAL_ERROR "run_consumer_test.cmake: -D${v}=... missing")
  endif()
endforeach()

set(prefix ${KDL_WORK_DIR}/prefix)
set(bdir ${KDL_WORK_DIR}/build)
file(REMOVE_RECURSE ${KDL_WORK_DIR})
file(MAKE_DIRECTORY ${KDL_WORK_DIR})

function(run_step name)
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "install_consumer: ${name} failed (${rc})\n${out}\n${err}")
  endif()
  message(STATUS "install_consumer: ${name}: ok")
  set(step_output "${out}" PARENT_SCOPE)
endfunction()

run_step("install" ${CMAKE_COMMAND} --install ${KDL_BUILD_DIR} --prefix ${prefix})

# What must be there (lib or lib64, as GNUInstallDirs chose).
file(GLOB_RECURSE cfg LIST_DIRECTORIES false ${prefix}/*/kdlossConfig.cmake)
file(GLOB_RECURSE pcs LIST_DIRECTORIES false ${prefix}/*/kdloss.pc)
file(GLOB_RECURSE sos LIST_DIRECTORIES false ${prefix}/*/libkdloss.so.*)
file(GLOB_RECURSE statics LIST_DIRECTORIES false ${prefix}/*/libkdloss.a)
foreach(want cfg pcs sos statics)
  if(NOT ${want})
    message(FATAL_ERROR "install_consumer: nothing installed for '${want}' under ${prefix}")
  endif()
endforeach()
foreach(h kdloss.h kdloss_types.h kdloss_ref.h kdloss_ot.h detail/elem.h)
  if(NOT EXISTS ${prefix}/include/kdloss/${h})
    message(FATAL_ERROR "install_consumer: header include/kdloss/${h} not installed")
  endif()
endforeach()
if(NOT EXISTS ${prefix}/bin/kdloss)
  message(FATAL_ERROR "install_consumer: bin/kdloss not installed")
endif()

# find_package consumer.  Only the scratch prefix is searched for kdloss (the
# package registry and the system are ignored), so this tests the install.
run_step("configure consumer" ${CMAKE_COMMAND} -S ${KDL_CONSUMER_SRC} -B ${bdir}
  -G ${KDL_GENERATOR} -DCMAKE_C_COMPILER=${KDL_C_COMPILER}
  -DCMAKE_PREFIX_PATH=${prefix} -DCMAKE_FIND_USE_PACKAGE_REGISTRY=OFF
  -DCMAKE_FIND_USE_SYSTEM_PACKAGE_REGISTRY=OFF -Dkdloss_DIR=)
if(NOT step_output MATCHES "from ${prefix}/")
  message(FATAL_ERROR "install_consumer: kdloss was not found in ${prefix}:\n${step_output}")
endif()
run_step("build consumer" ${CMAKE_COMMAND} --build ${bdir})
run_step("run consumer_shared" ${bdir}/consumer_shared)
message(STATUS "${step_output}")
run_step("run consumer_static" ${bdir}/consumer_static)

# pkg-config consumer.
if(KDL_PKG_CONFIG)
  list(GET pcs 0 pc)
  get_filename_component(pcdir ${pc} DIRECTORY)
  set(ENV{PKG_CONFIG_PATH} ${pcdir})
  execute_process(COMMAND ${KDL_PKG_CONFIG} --cflags --libs kdloss
    RESULT_VARIABLE rc OUTPUT_VARIABLE flags ERROR_VARIABLE err OUTPUT_STRIP_TRAILING_WHITESPACE)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "install_consumer: pkg-config --cflags --libs kdloss failed\n${err}")
  endif()
  message(STATUS "install_consumer: pkg-config flags: ${flags}")
  separate_arguments(flags UNIX_COMMAND "${flags}")
  list(GET sos 0 so)
  get_filename_component(libdir ${so} DIRECTORY)
  run_step("pkg-config build" ${KDL_C_COMPILER} ${KDL_CONSUMER_SRC}/consumer.c -o
    ${KDL_WORK_DIR}/consumer_pc ${flags} -Wl,-rpath,${libdir} -lm)
  run_step("run consumer_pc" ${KDL_WORK_DIR}/consumer_pc)
else()
  message(STATUS "install_consumer: pkg-config not found; pkg-config check skipped")
endif()

run_step("installed command" ${prefix}/bin/kdloss --version)
message(STATUS "install_consumer: all steps passed")
