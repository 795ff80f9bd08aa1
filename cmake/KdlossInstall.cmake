# cmake/KdlossInstall.cmake - install rules and the CMake / pkg-config
# packages of kdloss; included from the top-level CMakeLists.txt after the
# targets kdloss, kdloss_static and kdloss_cli are defined.
#
# Installs (GNUInstallDirs layout):
#   include/kdloss/*.h, include/kdloss/detail/*    the public headers
#   lib/libkdloss.so.0.1.0 (+ .so.0, .so links)    kdloss::kdloss
#   lib/libkdloss.a                                kdloss::kdloss_static
#   bin/kdloss                                     the command
#   lib/cmake/kdloss/kdloss{Config,ConfigVersion,Targets*}.cmake
#   lib/pkgconfig/kdloss.pc
#
# Consumers:   find_package(kdloss 0.1 CONFIG REQUIRED)
#              target_link_libraries(app PRIVATE kdloss::kdloss)
# or           cc app.c $(pkg-config --cflags --libs kdloss)
#
# With KDL_BUILD_TESTS, registers the CTest entry `install_consumer`, which
# installs this build into a scratch prefix and builds and runs
# tests/consumer/ against it (find_package and pkg-config).

include(GNUInstallDirs)
include(CMakePackageConfigHelpers)

set(KDL_INSTALL_CMAKEDIR ${CMAKE_INSTALL_LIBDIR}/cmake/kdloss CACHE STRING
    "Where kdlossConfig.cmake is installed (relative to the prefix)")
mark_as_advanced(KDL_INSTALL_CMAKEDIR)

# Installed binaries keep the directories of the libraries they link that lie
# outside the build (the CUDA toolkit's lib dir), so libkdloss.so and the
# command find libcudart/libcublas without LD_LIBRARY_PATH (the command links
# the static library, so it needs no path to libkdloss.so).
set_target_properties(kdloss kdloss_cli PROPERTIES INSTALL_RPATH_USE_LINK_PATH TRUE)

# ------------------------------------------------------------------ targets
install(TARGETS kdloss kdloss_static
  EXPORT kdlossTargets
  LIBRARY DESTINATION ${CMAKE_INSTALL_LIBDIR} COMPONENT Runtime NAMELINK_COMPONENT Development
  ARCHIVE DESTINATION ${CMAKE_INSTALL_LIBDIR} COMPONENT Development
  RUNTIME DESTINATION ${CMAKE_INSTALL_BINDIR} COMPONENT Runtime
  INCLUDES DESTINATION ${CMAKE_INSTALL_INCLUDEDIR})
install(TARGETS kdloss_cli RUNTIME DESTINATION ${CMAKE_INSTALL_BINDIR} COMPONENT Runtime)

# The Python wheel (pyproject.toml, scikit-build-core sets SKBUILD): the
# shared library inside the package, where kdloss/_lib.py looks first after
# KDLOSS_LIBRARY, and the command as a script; component "python" only.
if(SKBUILD)
  install(TARGETS kdloss LIBRARY DESTINATION kdloss/lib COMPONENT python)
  install(TARGETS kdloss_cli RUNTIME DESTINATION ${SKBUILD_SCRIPTS_DIR} COMPONENT python)
endif()

# ------------------------------------------------------------------ headers
install(DIRECTORY ${PROJECT_SOURCE_DIR}/include/kdloss
  DESTINATION ${CMAKE_INSTALL_INCLUDEDIR} COMPONENT Development
  FILES_MATCHING PATTERN "*.h" PATTERN "*.inc" PATTERN "*.cuh")

# ------------------------------------------------------------- CMake package
install(EXPORT kdlossTargets
  NAMESPACE kdloss::
  FILE kdlossTargets.cmake
  DESTINATION ${KDL_INSTALL_CMAKEDIR} COMPONENT Development)

# Values substituted into kdlossConfig.cmake.
if(KDL_ENABLE_CUDA)
  set(KDL_CONFIG_WITH_CUDA ON)
else()
  set(KDL_CONFIG_WITH_CUDA OFF)
endif()
configure_package_config_file(
  ${CMAKE_CURRENT_LIST_DIR}/kdlossConfig.cmake.in
  ${PROJECT_BINARY_DIR}/kdlossConfig.cmake
  INSTALL_DESTINATION ${KDL_INSTALL_CMAKEDIR})
# 0.x: a minor bump may break the API, so only the same minor is compatible.
write_basic_package_version_file(
  ${PROJECT_BINARY_DIR}/kdlossConfigVersion.cmake
  VERSION ${PROJECT_VERSION}
  COMPATIBILITY SameMinorVersion)
install(FILES ${PROJECT_BINARY_DIR}/kdlossConfig.cmake ${PROJECT_BINARY_DIR}/kdlossConfigVersion.cmake
  DESTINATION ${KDL_INSTALL_CMAKEDIR} COMPONENT Development)

# Build-tree package as well (find_package with kdloss_DIR=<build dir>).
export(EXPORT kdlossTargets NAMESPACE kdloss:: FILE ${PROJECT_BINARY_DIR}/kdlossTargets.cmake)

# ------------------------------------------------------ pkg-config package
# The prefix is written relative to the .pc file (${pcfiledir}), so the
# installed tree can be moved and `cmake --install --prefix` works.
if(IS_ABSOLUTE "${CMAKE_INSTALL_LIBDIR}")
  set(KDL_PC_PREFIX "${CMAKE_INSTALL_PREFIX}")
  set(KDL_PC_LIBDIR "${CMAKE_INSTALL_LIBDIR}")
else()
  file(RELATIVE_PATH _kdl_pc_up "/_kdl_/${CMAKE_INSTALL_LIBDIR}/pkgconfig" "/_kdl_")
  string(REGEX REPLACE "/$" "" _kdl_pc_up "${_kdl_pc_up}")
  set(KDL_PC_PREFIX "\${pcfiledir}/${_kdl_pc_up}")
  set(KDL_PC_LIBDIR "\${prefix}/${CMAKE_INSTALL_LIBDIR}")
endif()
if(IS_ABSOLUTE "${CMAKE_INSTALL_INCLUDEDIR}")
  set(KDL_PC_INCLUDEDIR "${CMAKE_INSTALL_INCLUDEDIR}")
else()
  set(KDL_PC_INCLUDEDIR "\${prefix}/${CMAKE_INSTALL_INCLUDEDIR}")
endif()
# Static linking (pkg-config --static) also needs libm and the CUDA runtime
# and cuBLAS; the shared library records them itself (DT_NEEDED + RUNPATH).
set(KDL_PC_LIBS_PRIVATE "-lm")
set(KDL_PC_CFLAGS "")
if(KDL_ENABLE_CUDA)
  set(KDL_PC_CFLAGS "-DKDL_HAVE_CUDA=1")
  get_target_property(_kdl_cudart_loc CUDA::cudart IMPORTED_LOCATION)
  if(_kdl_cudart_loc)
    get_filename_component(_kdl_cuda_libdir "${_kdl_cudart_loc}" DIRECTORY)
  else()
    set(_kdl_cuda_libdir "${CUDAToolkit_LIBRARY_DIR}")
  endif()
  set(KDL_PC_LIBS_PRIVATE "-L${_kdl_cuda_libdir} -lcudart -lcublas -lm")
endif()
configure_file(${CMAKE_CURRENT_LIST_DIR}/kdloss.pc.in ${PROJECT_BINARY_DIR}/kdloss.pc @ONLY)
install(FILES ${PROJECT_BINARY_DIR}/kdloss.pc
  DESTINATION ${CMAKE_INSTALL_LIBDIR}/pkgconfig COMPONENT Development)

# ----------------------------------------------------------- consumer test
# CMakeLists.txt includes this file before enable_testing(); enable it here
# (idempotent) so add_test() registers in this directory.
if(KDL_BUILD_TESTS AND EXISTS ${PROJECT_SOURCE_DIR}/tests/consumer/CMakeLists.txt)
  enable_testing()
  find_program(KDL_PKG_CONFIG_EXECUTABLE NAMES pkg-config pkgconf)
  mark_as_advanced(KDL_PKG_CONFIG_EXECUTABLE)
  add_test(NAME install_consumer
    COMMAND ${CMAKE_COMMAND}
      -DKDL_BUILD_DIR=${PROJECT_BINARY_DIR}
      -DKDL_CONSUMER_SRC=${PROJECT_SOURCE_DIR}/tests/consumer
      -DKDL_WORK_DIR=${PROJECT_BINARY_DIR}/install-consumer
      -DKDL_GENERATOR=${CMAKE_GENERATOR}
      -DKDL_C_COMPILER=${CMAKE_C_COMPILER}
      -DKDL_PKG_CONFIG=${KDL_PKG_CONFIG_EXECUTABLE}
      -DKDL_WITH_CUDA=${KDL_CONFIG_WITH_CUDA}
      -P ${PROJECT_SOURCE_DIR}/tests/consumer/run_consumer_test.cmake)
  set_tests_properties(install_consumer PROPERTIES TIMEOUT 600)
endif()
